"""Performance stage: ``torch.compile`` of the backbone vs eager, channels-last bf16, DINO ResNet-50 (2 x 224 +
6 x 96), batch 32 - the batch of the ``train_step`` correctness stage, whose compiled graphs the shared inductor cache
(``<out>/inductor_cache``) then holds. The compile time is the reported warm-up, excluded from images/s."""

from __future__ import annotations

from benchmarks.gpu_check.child import tiny
from benchmarks.gpu_check.perf_step import run


def main() -> int:
    return run(["dino_rn50"], ["channels-last bf16", "compile + channels-last + bf16"], batch=4 if tiny() else 32,
               steps=1 if tiny() else 5, rounds=1 if tiny() else 2)


if __name__ == "__main__":
    raise SystemExit(main())
