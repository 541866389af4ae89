"""Performance stage: device augmentation throughput (images/s) per op on 224 px images and for the whole DINO
recipe (2 x 224 + 6 x 96 uint8 crops in, normalised bf16 channels-last views out; one image = all its crops), exact
and fused jitter, eager and compiled. Every op gets a full batch with every sample selected (the throughput of the
op itself; in the recipe only the drawn fraction runs it). Published anchors (RTX A6000, per-sample batched colour
jitter): HSV hue ~17.5k img/s, YIQ hue ~132k img/s, Gaussian blur ~126k img/s. ``--tiny``: 32 px, small batches."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.gpu_check.child import Recorder, device, median_seconds, tiny
from pipeline.augment import blur_ops, color_matrix, color_ops, pixel_ops
from pipeline.augment.gpu_augment import DeviceAugment
from pipeline.batch import Batch
from pipeline.config import AugmentConfig, DataConfig, dino_views

ANCHORS = {"adjust_hue (HSV)": "anchor ~17.5k img/s (RTX A6000)", "fused jitter (affine colour map)":
           "YIQ-style anchor ~132k img/s (RTX A6000)", "gaussian_blur": "anchor ~126k img/s (RTX A6000)"}


def op_table(x: torch.Tensor) -> dict:
    """name -> fn() for each op on the float batch ``x`` (N, 3, H, W), all samples selected."""
    n, dev = x.shape[0], x.device
    gen = torch.Generator().manual_seed(0)
    f = (0.6 + 0.8 * torch.rand(n, generator=gen)).to(dev)
    shift = (0.2 * torch.rand(n, generator=gen) - 0.1).to(dev)
    order = torch.stack([torch.randperm(4, generator=gen) for _ in range(n)])
    factors = torch.stack([f.cpu(), f.cpu(), f.cpu(), shift.cpu()], dim=1)
    active = torch.ones(n, dtype=torch.bool)
    u8 = (x * 255).to(torch.uint8)
    sigma = (0.1 + 1.9 * torch.rand(n, generator=gen)).to(dev)
    size = blur_ops.blur_kernel_size(2.0)
    scale, bias = torch.ones(1, 3, 1, 1, device=dev), torch.zeros(1, 3, 1, 1, device=dev)

    def fused_jitter():
        m, b = color_matrix.jitter_matrices(order.to(dev), factors.to(dev), active.to(dev),
                                            color_matrix.channel_means(u8))
        return color_matrix.apply_color_matrix_u8(u8, m, b)
    return {
        "uint8 -> float": lambda: pixel_ops.to_float01(u8),
        "adjust_brightness": lambda: color_ops.adjust_brightness(x, f),
        "adjust_contrast": lambda: color_ops.adjust_contrast(x, f),
        "adjust_saturation": lambda: color_ops.adjust_saturation(x, f),
        "adjust_hue (HSV)": lambda: color_ops.adjust_hue(x, shift),
        "colour jitter exact (4 ops, random order)": lambda: color_ops.color_jitter_exact(
            x, order, factors.to(dev), active, (True,) * 4),
        "fused jitter (affine colour map)": fused_jitter,
        "grayscale": lambda: color_ops.grayscale(x),
        "gaussian_blur": lambda: blur_ops.gaussian_blur(x, sigma, size),
        "solarize": lambda: pixel_ops.solarize(x),
        "normalize": lambda: pixel_ops.normalize(x, scale, bias),
    }


def recipe_batch(views, b: int, dev: torch.device) -> Batch:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 256, (b, 3, v.size, v.size), generator=gen, dtype=torch.uint8).to(dev) for v in views]
    return Batch(xs, torch.zeros(b, dtype=torch.long, device=dev), torch.arange(b, device=dev), 2)


def main() -> int:
    rec, dev, small = Recorder(), device(), tiny()
    n, size, reps = (16, 32, 2) if small else (256, 224, 10)
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    rec.note(f"per op: batch {n} x 3 x {size} x {size} fp32, median of {reps} reps")
    for name, fn in op_table(x).items():
        t = rec.attempt(name, lambda fn=fn: median_seconds(fn, dev, reps))
        if t is not None:
            rec.add(f"op {name}", n / t, "images/s", note=ANCHORS.get(name, ""))
    views = DataConfig(views=dino_views(n_local=2 if small else 6, local_size=16 if small else 96)).expanded_views()
    if small:
        views = [dataclasses.replace(v, size=32) if v.role == "global" else v for v in views]
    b = 4 if small else 64
    batch = recipe_batch(views, b, dev)
    for impl in ("exact", "fused"):
        for compile in (False, True):
            aug = DeviceAugment(views, DataConfig().mean, DataConfig().std, torch.bfloat16, True, seed=0, flip=True,
                                compile=compile, impl=AugmentConfig(jitter_impl=impl))
            label = f"DINO recipe {'2x224+6x96' if not small else 'tiny'} {impl} {'compiled' if compile else 'eager'}"
            t = rec.attempt(label, lambda aug=aug: median_seconds(lambda: aug(batch, step=3), dev, reps, warmup=2))
            if t is not None:
                rec.add(label, b / t, "images/s", note=f"batch {b}, bf16 channels-last out")
    rec.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
