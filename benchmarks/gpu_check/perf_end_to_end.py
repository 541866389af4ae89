"""Performance stage: ``train.py --benchmark`` (``engine.benchmark.run_benchmark``) for DINO ResNet-50 and DINO
ViT-S/16 (2 x 224 + 6 x 96, batch 64, fp16 + GradScaler as the configs, channels-last) with the torchvision loader
on all but one of the machine's cores (decode + crop + flip in workers; colour ops by ``DeviceAugment`` on the GPU)
over synthetic ImageNet-like JPEGs written first: loader alone, device augmentation alone, model step alone,
end to end, data-wait fraction; next to ``benchmarks.cost_model``'s prediction for an H100/H200 (bf16 dense peak x
an assumed 20-35% MFU, FLOPs counted on the CPU at batch 2)."""

from __future__ import annotations

import os

from benchmarks.cost_model import expected_throughput, step_flops_per_image
from benchmarks.gpu_check.child import Recorder, device, tiny, work_dir
from benchmarks.gpu_check.perf_step import LABELS
from benchmarks.gpu_check.setups import check_config, write_jpegs
from engine.benchmark import run_benchmark

PEAK = "H100 (SXM, bf16)"  # H200: the same dense bf16 peak (989 TFLOP/s), more memory bandwidth


def record(rec: Recorder, label: str, r: dict, cfg) -> None:
    rec.add(f"{label} loader only (torchvision, {cfg.data.workers} workers)", r["loader_img_s"], "images/s")
    rec.add(f"{label} device augmentation only", r["augment_img_s"], "images/s")
    rec.add(f"{label} model step only (ceiling)", r["model_img_s"], "images/s",
            note=f"loss forward {100 * r['loss_fraction']:.0f}% of the step")
    rec.add(f"{label} end to end", r["end_to_end_img_s"], "images/s",
            note=f"{100 * r['end_to_end_vs_model']:.0f}% of the ceiling; {r['verdict']}")
    rec.add(f"{label} data-wait fraction", r["data_wait_fraction"], "fraction of end-to-end time")
    rec.add(f"{label} peak memory", r["peak_memory_mb"], "MiB", note="torch.cuda.max_memory_allocated (CPU: RSS)")
    flops = step_flops_per_image(cfg)
    lo, hi = expected_throughput(flops)[PEAK]
    rec.add(f"{label} FLOPs per image per step", flops / 1e9, "GFLOP", note="benchmarks.cost_model, FlopCounterMode")
    rec.add(f"{label} cost-model prediction (low, MFU 20%)", lo, "images/s", note=PEAK)
    rec.add(f"{label} cost-model prediction (high, MFU 35%)", hi, "images/s", note=PEAK)
    rec.add(f"{label} measured model step / predicted low", r["model_img_s"] / lo, "x")


def main() -> int:
    rec, dev, small = Recorder(), device(), tiny()
    batch, steps = (4, 2) if small else (64, 10)
    workers = 0 if small else max(1, (os.cpu_count() or 2) - 1)
    folder = write_jpegs(work_dir("data", "e2e"), batch * (steps + 2), size=48 if small else 430)
    rec.note(f"{batch * (steps + 2)} synthetic JPEGs (~430 px, q90), batch {batch}, {steps} steps per phase")
    if small:
        rec.note("tiny: ResNet-18 with 32/16 px crops stands in for every recipe")
    for recipe in ("dino_rn50",) if small else ("dino_rn50", "dino_vits"):
        cfg = check_config(recipe, folder, work_dir("runs", f"e2e_{recipe}"), batch, precision="fp16",
                           workers=workers, tiny=small, device=dev.type)
        label = LABELS[recipe]
        r = rec.attempt(f"{label} benchmark", lambda cfg=cfg: run_benchmark(cfg, steps))
        if r:
            rec.attempt(f"{label} cost model", lambda cfg=cfg, r=r, label=label: record(rec, label, r, cfg))
    rec.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
