"""Typed configuration of the data pipeline: the multi-crop view recipe and the loader (``data:``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from runtime.config_loader import (
    ConfigError,
    bounded,
)


@dataclass
class ViewConfig:
    """One entry of the multi-crop recipe; expands to ``count`` crops with the same recipe.

    Globals must come before locals. Colour jitter strengths follow torchvision's ColorJitter semantics.
    """

    role: Literal["global", "local"] = "global"
    count: int = bounded(1, ge=1)
    size: int = bounded(224, ge=8)  # output side in pixels (224 global, 96 local for DINO-style multi-crop)
    scale: tuple[float, float] = bounded((0.25, 1.0), gt=0, le=1)  # area fraction range of RandomResizedCrop
    ratio: tuple[float, float] = bounded((3 / 4, 4 / 3), gt=0)  # aspect-ratio range (log-uniform), as torchvision
    flip_p: float = bounded(0.5, ge=0, le=1)
    jitter_p: float = bounded(0.8, ge=0, le=1)
    brightness: float = bounded(0.4, ge=0)
    contrast: float = bounded(0.4, ge=0)
    saturation: float = bounded(0.2, ge=0)
    hue: float = bounded(0.1, ge=0, le=0.5)
    grayscale_p: float = bounded(0.2, ge=0, le=1)
    blur_p: float = bounded(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), gt=0)
    solarize_p: float = bounded(0.0, ge=0, le=1)
    # Blur kernel length in output pixels; 0 = 2*ceil(3*blur_sigma[1])+1 (13 taps for sigma<=2). sigma is in output
    # pixels for every crop size, as in DINO (PIL GaussianBlur(radius=sigma) on the resized crop).
    blur_kernel: int = bounded(0, ge=3, also=(0,))
    # Keys that belong to another section (one value for every view): the loader's error names the new key.
    moved_keys: ClassVar[dict[str, str]] = {"jitter_impl": "data.augment.jitter_impl",
                                            "cpu_impl": "data.augment.cpu_impl"}

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"views[].{name}: need min <= max, got {getattr(self, name)}")
        if self.blur_kernel % 2 == 0 and self.blur_kernel != 0:
            raise ConfigError(f"views[].blur_kernel: must be 0 (auto) or an odd number >= 3, got {self.blur_kernel}")


@dataclass
class AugmentConfig:
    """How the device augmentation (``pipeline/augment/``) runs every view's recipe; the recipe itself is in the
    views. Only the device path reads it, not the per-image PIL path. Each switch selects rows of the backend table
    ``pipeline.augment.backends.BACKENDS``.
    """

    # Colour jitter: "exact" = torchvision float semantics (clamp after each op, HSV hue), the reference; "fused" = one
    # per-sample affine colour map (hue as a rotation about the grey axis), cheaper (docs/performance.md) but mean
    # |diff| 7.6/255 vs torchvision with hue 0.1 (color_matrix.jitter_matrices).
    jitter_impl: Literal["exact", "fused"] = "exact"
    # CPU batches: "kernel" = numba kernels for the exact colour stage and the blur (color_kernel.py, blur_kernel.py:
    # same results to float32 rounding, about 10x cheaper than the torch ops); "torch" = the torch ops (what every
    # other device runs).
    cpu_impl: Literal["kernel", "torch"] = "kernel"


def dino_views(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=8, local_size=96) -> list[ViewConfig]:
    """DINO multi-crop: g1 always blurred, g2 blur 0.1 + solarize 0.2, locals blur 0.5."""
    return [
        ViewConfig("global", 1, 224, global_scale, blur_p=1.0),
        ViewConfig("global", 1, 224, global_scale, blur_p=0.1, solarize_p=0.2),
        ViewConfig("local", n_local, local_size, local_scale, blur_p=0.5),
    ]


@dataclass
class DataConfig:
    loader: Literal["torchvision", "ffcv", "dali"] = "torchvision"
    # torchvision: ImageFolder directory; ffcv: .beton file; dali: shard directory written by convert_dataset.py
    train_path: str = "data/demo/train"
    batch_size: int = bounded(64, ge=1)  # per rank; the global batch is batch_size * world_size
    # loader worker processes/threads per rank; use every core not driving the accelerator
    workers: int = bounded(2, ge=0)
    views: list[ViewConfig] = field(default_factory=dino_views)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # implementation switches of the device augmentation
    # torchvision loader only: False = the official repos' way (every op in PIL per image in workers);
    # True = PIL does decode+crop+flip, colour/blur/solarize run batched on the device (much faster).
    device_augment: bool = True
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resize kernel of RandomResizedCrop (DINO: bicubic)
    mean: tuple[float, float, float] = bounded((0.485, 0.456, 0.406), ge=0, le=1)
    std: tuple[float, float, float] = bounded((0.229, 0.224, 0.225), gt=0)
    os_cache: bool = True  # ffcv: read through the page cache (True when the dataset fits in RAM)
    order: Literal["random", "quasi_random"] = "random"  # ffcv sample order; quasi_random needs less RAM
    # kNN / probe center-crop side (images are resized to eval_size * 256/224 first). 0 = the first global view's
    # size: evaluate at the resolution the backbone was trained at (224 for the ImageNet recipes).
    eval_size: int = bounded(0, ge=8, also=(0,))

    def __post_init__(self) -> None:
        if not self.views:
            raise ConfigError("data.views: at least one view is required")
        roles = [v.role for v in self.views]
        if "global" not in roles:
            raise ConfigError("data.views: at least one view must have role 'global'")
        if roles != sorted(roles, key=lambda r: r != "global"):
            raise ConfigError(f"data.views: global views must come before local views, got roles {roles}")
        if self.eval_size == 0:
            self.eval_size = self.views[0].size

    @property
    def n_global(self) -> int:
        return sum(v.count for v in self.views if v.role == "global")

    @property
    def n_local(self) -> int:
        return sum(v.count for v in self.views if v.role == "local")

    def expanded_views(self) -> list[ViewConfig]:
        """One ViewConfig per crop (``count`` expanded), globals first."""
        return [dataclasses.replace(v, count=1) for v in self.views for _ in range(v.count)]
