"""Expected GPU throughput from a FLOP count of the configured training step.

    python -m benchmarks.cost_model --method dino --config configs/exp/dino_in1k.yaml

Counts the FLOPs of one real training step (student forward + backward over every crop, teacher forward, heads and
loss) with ``torch.utils.flop_counter.FlopCounterMode`` on the CPU at a small batch, scales to one image, and turns
that into an expected images/s per accelerator as ``MFU x peak / FLOPs-per-image``. The MFU range is an assumption
stated next to the number (convolutional nets in bf16 typically reach 20-40% of dense peak; see docs/gpu_cost_model.md),
so a user on a GPU can compare ``--benchmark`` output with the expectation.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import Config, load_config
from methods import StepContext, build_method

# dense bf16 tensor-core peaks, FLOP/s (vendor datasheets, without sparsity)
PEAKS = {"A100 (SXM, bf16)": 312e12, "H100 (SXM, bf16)": 989e12}


def step_flops_per_image(cfg: Config, batch: int = 2) -> float:
    """FLOPs (matmul/conv, as FlopCounterMode counts them) of one training step divided by the batch."""
    method = build_method(cfg)
    method.train()
    views = [torch.randn(batch, 3, v.size, v.size) for v in cfg.data.expanded_views()]
    ctx = StepContext(0, 0, 1, 1)
    counter = FlopCounterMode(display=False)
    with counter:
        out = method(views, cfg.data.n_global, ctx)
        out.loss.backward()
    return counter.get_total_flops() / batch


def expected_throughput(flops_per_image: float,
                        mfu: tuple[float, float] = (0.2, 0.35)) -> dict[str, tuple[float, float]]:
    """images/s per device for the MFU range, for each accelerator in PEAKS."""
    return {name: (mfu[0] * peak / flops_per_image, mfu[1] * peak / flops_per_image) for name, peak in PEAKS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--mfu", type=float, nargs=2, default=(0.2, 0.35), help="assumed model-FLOP utilisation range")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.method, args.config, args.overrides)
    flops = step_flops_per_image(cfg)
    views = "+".join(f"{v.count}x{v.size}" for v in cfg.data.views)
    print(f"{cfg.method} {cfg.model.backbone} views {views}: {flops / 1e9:.1f} GFLOP per image per training step")
    for name, (lo, hi) in expected_throughput(flops, tuple(args.mfu)).items():
        mfu = f"{args.mfu[0]:.0%}-{args.mfu[1]:.0%}"
        print(f"  {name:<18} expected {lo:,.0f} - {hi:,.0f} images/s per GPU at MFU {mfu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
