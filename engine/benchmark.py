"""``train.py --benchmark``: where does the time go?

Measures, in one invocation with the configured model, views, precision and loader:
1. loader only (decode + crop, per rank), and the device augmentation alone on cached batches;
2. model step only on a cached, device-resident, augmented batch (forward, backward, optimizer, EMA, loss state):
   the compute ceiling; the loss modules' forward time is measured with hooks;
3. end to end (the real training step fed by the loader), with the data-wait fraction.
Warm-up steps (compilation, JIT, allocator) are excluded and reported separately. Prints a table and a one-line
verdict naming the bottleneck, and writes ``<out_dir>/benchmark.json``.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch
from torch import nn

from engine.config import Config
from methods import StepContext
from runtime import dist
from runtime.logging import log


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak process RSS (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LossTimer:
    """Accumulates the forward time of every ``*Loss`` sub-module via hooks (sync'd on CUDA)."""

    def __init__(self, method: nn.Module, device: torch.device):
        self.device, self.total, self._t0 = device, 0.0, {}
        self.handles = []
        for m in method.modules():
            if type(m).__name__.endswith("Loss"):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        _sync(self.device)
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        _sync(self.device)
        self.total += time.perf_counter() - self._t0.pop(id(module))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _timed(fn, n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    _sync(device)
    return time.perf_counter() - t0


def measure_loader(trainer, n: int) -> tuple[float, list]:
    """Seconds for ``n`` batches straight from the loader (first batch excluded: worker start-up)."""
    it = trainer.loader.epoch_iter(0, 0)
    batches = [next(it)]
    t0 = time.perf_counter()
    for _ in range(n):
        batches.append(next(it))
    return time.perf_counter() - t0, batches


def measure_model(trainer, batch, n: int, warmup: int) -> tuple[float, float, float]:
    """(warm-up seconds, step seconds for n steps, loss-forward seconds) on one cached device batch."""
    ctx = StepContext(0, 0, trainer.steps_per_epoch, trainer.total_steps)
    batch = batch.to(trainer.device)
    t_w = _timed(lambda i: trainer.train_step(batch, ctx), warmup, trainer.device)
    timer = LossTimer(trainer.method, trainer.device)
    t = _timed(lambda i: trainer.train_step(batch, ctx), n, trainer.device)
    timer.close()
    return t_w, t, timer.total


def measure_end_to_end(trainer, n: int) -> tuple[float, float]:
    """(seconds, data-wait seconds) of ``n`` real steps fed by the loader."""
    it = trainer.loader.epoch_iter(1 % trainer.cfg.train.epochs, 0)
    wait = 0.0
    _sync(trainer.device)
    t0 = time.perf_counter()
    for i in range(n):
        tw = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - tw
        trainer.train_step(batch, StepContext(i, 0, trainer.steps_per_epoch, trainer.total_steps))
    _sync(trainer.device)
    return time.perf_counter() - t0, wait


def measure_augment(trainer, batches: list, n: int) -> float:
    """Seconds for ``n`` device augmentations of cached loader batches (0 if the loader augments itself)."""
    if trainer.augment is None or batches[0].augmented:
        return 0.0
    dev = [b.to(trainer.device) for b in batches[: max(1, min(len(batches), 4))]]
    trainer.augment(dev[0], step=0)  # warm-up (compile, allocator)
    return _timed(lambda i: trainer.augment(dev[i % len(dev)], step=i), n, trainer.device)


def comm_seconds(trainer, n: int) -> float:
    """Seconds for ``n`` all-reduces of a gradient-sized fp32 buffer (0 in a single process)."""
    if not dist.is_dist():
        return 0.0
    numel = sum(p.numel() for p in trainer.method.student.parameters() if p.requires_grad)
    buf = torch.zeros(numel, device=trainer.device)
    dist.all_reduce_sum(buf)
    return _timed(lambda i: dist.all_reduce_sum(buf), n, trainer.device)


def verdict(r: dict) -> str:
    """One line naming the bottleneck and the option most likely to help."""
    e2e, model = r["end_to_end_img_s"], r["model_img_s"]
    feeds = {"loader": r["loader_img_s"], "augmentation": r["augment_img_s"] or float("inf")}
    if r["comm_fraction"] > 0.25:
        return "bottleneck: communication -- larger per-rank batch, fewer/larger buckets, or gradient compression"
    if e2e >= 0.85 * model or min(feeds.values()) >= model:
        if r["loss_fraction"] > 0.3:
            return "bottleneck: loss -- enable the fused loss kernels (FLASHSSL_FUSED=1) or a smaller ssl.out_dim/queue"
        return ("bottleneck: model -- model.precision=bf16, model.channels_last=true, model.compile=true, "
                "or a larger batch per device")
    worst = min(feeds, key=feeds.get)
    if worst == "loader":
        return ("bottleneck: loader -- use data.loader=ffcv (decode once per image) or dali, more data.workers, "
                "and pre-resized data (convert_dataset.py --max-side)")
    return "bottleneck: augmentation -- run colour ops with the fast fused path / compiled augmentation"


def run_benchmark(cfg: Config, steps: int) -> dict:
    """Run the three phases and print the table; returns the result dict (also written as JSON on rank 0)."""
    from engine.trainer import Trainer

    cfg.train.resume = ""
    trainer = Trainer(cfg, measure_only=True)  # a measurement, not a run: train.out_dir's run is left alone
    trainer.model.train()
    n = max(2, min(steps, trainer.steps_per_epoch - 1))
    warmup = max(1, min(3, n))
    b = cfg.data.batch_size
    t_load, batches = measure_loader(trainer, n)
    t_aug = measure_augment(trainer, batches, n)
    aug_batch = batches[0] if trainer.augment is None else trainer.augment(batches[0].to(trainer.device), step=0)
    t_warm, t_model, t_loss = measure_model(trainer, aug_batch, n, warmup)
    t_comm = comm_seconds(trainer, n)
    t_e2e, t_wait = measure_end_to_end(trainer, n)
    r = {
        "method": cfg.method, "backbone": cfg.model.backbone, "loader": cfg.data.loader,
        "precision": cfg.model.precision, "compile": cfg.model.compile, "channels_last": cfg.model.channels_last,
        "batch_per_rank": b, "world_size": dist.world_size(), "steps": n, "warmup_steps": warmup,
        "views": [f"{v.count}x{v.size}" for v in cfg.data.views],
        "warmup_seconds": t_warm,
        "loader_batches_s": n / t_load, "loader_img_s": n * b / t_load,
        "augment_img_s": n * b / t_aug if t_aug > 0 else None,
        "model_img_s": n * b / t_model, "end_to_end_img_s": n * b / t_e2e,
        "loss_fraction": t_loss / t_model, "comm_fraction": t_comm / t_model,
        "data_wait_fraction": t_wait / t_e2e, "peak_memory_mb": peak_memory_mb(trainer.device),
    }
    r["end_to_end_vs_model"] = r["end_to_end_img_s"] / r["model_img_s"]
    r["verdict"] = verdict(r)
    print_table(r)
    if dist.is_main():
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        with open(os.path.join(cfg.train.out_dir, "benchmark.json"), "w") as f:
            json.dump(r, f, indent=2)
    return r


def print_table(r: dict) -> None:
    aug = f"{r['augment_img_s']:.1f}" if r["augment_img_s"] else "in loader"
    rows = [
        ("loader only (per rank)", f"{r['loader_img_s']:.1f}", f"{r['loader_batches_s']:.2f} batches/s"),
        ("device augmentation only", aug, ""),
        ("model step only (ceiling)", f"{r['model_img_s']:.1f}",
         f"loss fwd {100 * r['loss_fraction']:.0f}% of step, comm {100 * r['comm_fraction']:.0f}%"),
        ("end to end", f"{r['end_to_end_img_s']:.1f}",
         f"{100 * r['end_to_end_vs_model']:.0f}% of ceiling, data wait {100 * r['data_wait_fraction']:.0f}%"),
    ]
    log(f"\nbenchmark: method={r['method']} backbone={r['backbone']} loader={r['loader']} precision={r['precision']} "
        f"compile={r['compile']} views={'+'.join(r['views'])} batch/rank={r['batch_per_rank']} "
        f"ranks={r['world_size']} steps={r['steps']}")
    log(f"{'phase':<28}{'images/s':>10}  notes")
    for name, ips, note in rows:
        log(f"{name:<28}{ips:>10}  {note}")
    log(f"warm-up (excluded): {r['warmup_seconds']:.1f} s for {r['warmup_steps']} steps; "
        f"peak memory {r['peak_memory_mb']:.0f} MiB")
    log(r["verdict"])
