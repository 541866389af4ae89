"""Performance stage: the model step alone (forward, backward, optimizer, EMA, loss state on a cached augmented
batch: the compute ceiling) for DINO ResNet-50 and DINO ViT-S/16 (2 x 224 + 6 x 96, batch 64), eager fp32 vs
channels-last fp32 vs channels-last bf16 vs channels-last fp16 + GradScaler, interleaved in one process by
``benchmarks.fast_step.compare_variants``. ``torch.compile`` is the ``compile_step`` stage (its own budget)."""

from __future__ import annotations

from benchmarks.fast_step import compare_variants
from benchmarks.gpu_check.child import Recorder, device, tiny, work_dir
from benchmarks.gpu_check.setups import check_config, write_jpegs

VARIANTS = ["eager fp32", "channels-last fp32", "channels-last bf16", "channels-last fp16"]
LABELS = {"dino_rn50": "DINO ResNet-50", "dino_vits": "DINO ViT-S/16"}


def record_variants(rec: Recorder, label: str, result: dict) -> None:
    """images/s and speed-up rows for one ``compare_variants`` result."""
    base = next(iter(result))
    for name, r in result.items():
        rec.add(f"{label} model step {name}", r["images_per_s"], "images/s",
                note=f"{r['ms_per_step']:.1f} ms/step; warm-up {r['warmup_s']:.1f} s (excluded)")
        if name != base:
            rec.add(f"{label} {name} vs {base}", r["speedup"], "x")


def run(recipes: list[str], variants: list[str], batch: int, steps: int, rounds: int) -> int:
    rec, dev, small = Recorder(), device(), tiny()
    folder = write_jpegs(work_dir("data", "step"), 2 * batch, size=48 if small else 430)
    rec.note(f"batch {batch}, median of {rounds} rounds x {steps} steps per variant")
    if small:
        rec.note("tiny: ResNet-18 with 32/16 px crops stands in for every recipe")
    for recipe in recipes:
        cfg = check_config(recipe, folder, work_dir("runs", f"step_{recipe}"), batch, workers=0 if small else 4,
                           tiny=small, device=dev.type)
        result = rec.attempt(LABELS[recipe], lambda cfg=cfg: compare_variants(cfg, variants, steps, rounds))
        if result:
            record_variants(rec, LABELS[recipe], result)
    rec.flush()
    return 0


def main() -> int:
    if tiny():  # CPU self-test: one recipe, the fp32 baseline and the variant with the most code (fp16 + GradScaler)
        return run(["dino_rn50"], [VARIANTS[0], VARIANTS[-1]], batch=4, steps=1, rounds=1)
    return run(["dino_rn50", "dino_vits"], VARIANTS, batch=64, steps=5, rounds=2)


if __name__ == "__main__":
    raise SystemExit(main())
