"""Side-by-side measurement of the training-step options on one machine, in one run.

    python -m benchmarks.fast_step --method dino --config configs/exp/dino_demo.yaml --steps 10 --rounds 3

Runs the model step only (forward, backward, optimizer, EMA, loss state) on a cached augmented batch for each variant:
eager fp32 (NCHW), + channels-last, + bf16 autocast, + torch.compile of the backbone (and, on request, channels-last
fp16 autocast with GradScaler; on a CPU fp16 falls back to bf16). Variants are interleaved over
``--rounds`` rounds and the median is kept, because a shared machine is noisy; ratios are to the first variant
run (eager fp32 unless ``--variant`` picks others). Compilation / warm-up time is reported separately and excluded.
``--variant "channels-last fp32" --variant "channels-last bf16"`` under ``ONEDNN_MAX_CPU_ISA=AVX2`` (or AVX512_CORE,
...) shows what bf16 costs on a CPU without AMX (docs/performance.md, "Precision").
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from engine.config import load_config
from methods import StepContext

VARIANTS = {
    "eager fp32": dict(precision="fp32", channels_last=False, compile=False),
    "channels-last fp32": dict(precision="fp32", channels_last=True, compile=False),
    "channels-last bf16": dict(precision="bf16", channels_last=True, compile=False),
    "compile + channels-last + bf16": dict(precision="bf16", channels_last=True, compile=True),
    "channels-last fp16": dict(precision="fp16", channels_last=True, compile=False),  # CUDA: GradScaler; CPU: bf16
}
DEFAULT_VARIANTS = ["eager fp32", "channels-last fp32", "channels-last bf16", "compile + channels-last + bf16"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trainer(cfg, **model_opts):
    from engine.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    for k, v in model_opts.items():
        setattr(cfg.model, k, v)
    cfg.train.resume = ""
    return Trainer(cfg, measure_only=True)


def compare_variants(cfg, variants: list[str], steps: int, rounds: int) -> dict:
    """Model step of each variant on one cached augmented batch, interleaved over ``rounds``; prints the table and
    returns ``{variant: {ms_per_step, images_per_s, speedup (vs the first), warmup_s, all_ms}}``."""
    trainers = {name: _trainer(cfg, **VARIANTS[name]) for name in variants}
    first = next(iter(trainers.values()))
    raw = next(first.loader.epoch_iter(0, 0))
    ctx = StepContext(0, 0, first.steps_per_epoch, first.total_steps)
    warm, times = {}, {name: [] for name in trainers}
    for name, t in trainers.items():
        batch = raw if t.augment is None else t.augment(raw.to(t.device), step=0)
        t._bench_batch = batch
        t0 = time.perf_counter()
        for _ in range(2):
            t.train_step(batch, ctx)
        _sync(t.device)
        warm[name] = time.perf_counter() - t0
    for _ in range(rounds):
        for name, t in trainers.items():
            _sync(t.device)  # CUDA runs asynchronously: time whole steps, not their launches
            t0 = time.perf_counter()
            for _ in range(steps):
                t.train_step(t._bench_batch, ctx)
            _sync(t.device)
            times[name].append((time.perf_counter() - t0) / steps)
    base_name = variants[0]
    base = statistics.median(times[base_name])
    b = cfg.data.batch_size
    print(f"\nmodel step only: method={cfg.method} backbone={cfg.model.backbone} batch={b} "
          f"views={'+'.join(f'{v.count}x{v.size}' for v in cfg.data.views)} threads={torch.get_num_threads()}")
    print(f"{'variant':<34}{'ms/step':>9}{'images/s':>10}{'vs ' + base_name:>22}{'warm-up s':>11}")
    result = {}
    for name in trainers:
        med = statistics.median(times[name])
        result[name] = {"ms_per_step": 1e3 * med, "images_per_s": b / med, "speedup": base / med,
                        "warmup_s": warm[name], "all_ms": [1e3 * x for x in times[name]]}
        print(f"{name:<34}{1e3 * med:>9.1f}{b / med:>10.1f}{base / med:>21.2f}x{warm[name]:>11.1f}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--variant", action="append", choices=list(VARIANTS), dest="variants",
                   help="run this variant (repeatable; default: all but fp16); ratios are to the first")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    cfg = load_config(args.method, args.config, args.overrides + ["train.tensorboard=false"])
    result = compare_variants(cfg, args.variants, args.steps, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
