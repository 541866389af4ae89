"""Typed configuration tree.

Merge order (fixed): dataclass defaults <- ``configs/method/<method>.yaml`` <- each ``--config`` YAML in order
<- CLI ``key=value`` overrides. The method-specific ``ssl`` section is typed by the selected method's own
``Config`` dataclass (see ``methods/``). Field comments say *why* and give recommended values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.config_loader import (
    ConfigError,
    bounded,
    coerce,
    deep_merge,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
    # Device colour jitter: "exact" (default) = torchvision float semantics (clamp after each op, HSV hue);
    # "fused" = one per-sample affine colour map (hue as a rotation about the grey axis): ~1.7x cheaper than the torch
    # ops of "exact" (on CPU batches cpu_impl="kernel" makes "exact" nearly as cheap: 0.12 vs 0.09 s per DINO batch) but
    # mean |diff| 7.6/255 vs torchvision with hue 0.1 (see pipeline/augment_ops.py jitter_matrices). Only used by the
    # device augmentation (pipeline/gpu_augment.py), not by the PIL path. The blur kernel rule above applies to both.
    jitter_impl: Literal["exact", "fused"] = "exact"
    # Device augmentation of CPU batches: "kernel" = numba kernels for the exact colour stage and the blur
    # (pipeline/color_kernel.py, pipeline/blur_ops.py: same results to float32 rounding, ~10x cheaper); "torch" = the
    # torch ops (the reference; what other devices always run).
    cpu_impl: Literal["kernel", "torch"] = "kernel"

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"views[].{name}: need min <= max, got {getattr(self, name)}")
        if self.blur_kernel % 2 == 0 and self.blur_kernel != 0:
            raise ConfigError(f"views[].blur_kernel: must be 0 (auto) or an odd number >= 3, got {self.blur_kernel}")


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


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm name; resnet50 / vit_small_patch16_224 for the ImageNet recipes
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)  # stochastic depth (ViT: 0.1 is DINO's recommendation)
    # autocast dtype; fp16 adds a GradScaler (CUDA only). auto: bf16 on CUDA (fp16 without bf16 support) and on CPUs
    # with AMX, fp32 on other CPUs (bf16 is slower than fp32 there); the run's config.yaml records the resolved value
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC memory format: faster convolutions on GPUs with tensor cores and on CPU oneDNN
    compile: bool = False  # torch.compile the backbone; warm-up cost is paid once per resolution
    sync_bn: bool = True  # convert BN to SyncBatchNorm when world_size > 1 (the SCFS/DINO-ResNet recipes)


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw", "adam"] = "sgd"  # adam = torch Adam, weight decay as L2 in the gradient
    lr: float = bounded(0.1, gt=0)  # base lr for a global batch of 256; the used lr is scaled by lr_scaling
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    min_lr: float = bounded(0.0048, ge=0)  # final lr of the cosine (absolute, not scaled)
    warmup_epochs: float = bounded(10.0, ge=0)  # linear warm-up from 0 to the peak lr
    weight_decay: float = bounded(1e-4, ge=0)
    weight_decay_end: float | None = bounded(None, ge=0)  # cosine schedule of wd to this value; None = constant
    momentum: float = bounded(0.9, ge=0, lt=1)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    clip_grad: float = bounded(3.0, ge=0)  # 0 disables clipping
    clip_mode: Literal["per_param", "global"] = "per_param"  # DINO/SCFS clip each tensor to the norm separately
    # DINO: no gradient to the prototype layer during the first epoch(s)
    freeze_last_layer_epochs: int = bounded(1, ge=0)
    lars_eta: float = bounded(0.001, gt=0)
    fused: bool = True  # fused/foreach optimizer implementation where torch offers it


@dataclass
class TrainConfig:
    epochs: int = bounded(100, ge=1)
    steps_per_epoch: int = bounded(0, ge=0)  # 0 = one pass over the data; >0 caps an epoch (demo, smoke tests)
    out_dir: str = "runs/default"
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = bounded(10, ge=1)  # steps between host syncs for loss logging (each .item() is a sync)
    ckpt_every: int = bounded(200, ge=1)  # steps between checkpoints (and always at the end of an epoch)
    keep_last: int = bounded(3, ge=1)  # checkpoints kept on disk
    resume: str = ""  # '' = fresh run, 'auto' = newest valid checkpoint in out_dir, or a path
    knn_at_end: bool = True  # run weighted kNN on data.val_path after training
    tensorboard: bool = True


@dataclass
class EvalConfig:
    # labelled ImageFolder splits for kNN (at the end of training and in eval.py knn)
    train_dir: str = "data/demo/train"
    val_dir: str = "data/demo/val"
    knn_k: int = bounded(20, ge=1)
    knn_t: float = bounded(0.07, gt=0)
    batch_size: int = bounded(128, ge=1)
    features: Literal["teacher", "student", "auto"] = "auto"  # auto = the method's official choice


@dataclass
class Config:
    method: str = "dino"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: Any = None  # the selected method's Config dataclass instance


def load_config(method: str, config_files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the full config for ``method``; raises ConfigError before any work starts."""
    from methods import METHODS  # local import: methods import runtime, not the other way round

    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; allowed values: {', '.join(sorted(METHODS))}")
    merged: dict = {"method": method}
    method_yaml = os.path.join(CONFIG_DIR, "method", f"{method}.yaml")
    layers = [method_yaml] if os.path.exists(method_yaml) else []
    for path in layers + list(config_files or []):
        merged = deep_merge(merged, load_yaml(path))
    for item in overrides or []:
        merged = deep_merge(merged, parse_override(item))
    if merged.get("method", method) != method:
        raise ConfigError(f"method: the config says {merged['method']!r} but --method is {method!r}")
    ssl_raw = merged.pop("ssl", {}) or {}
    cfg = from_dict(Config, merged)
    cfg.ssl = coerce(METHODS[method].Config, ssl_raw, "ssl")
    METHODS[method].check_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return to_dict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by :func:`config_to_dict` (e.g. from a checkpoint)."""
    from methods import METHODS

    data = dict(data)
    ssl_raw = data.pop("ssl", {}) or {}
    cfg = from_dict(Config, data)
    cfg.ssl = coerce(METHODS.get_or_raise(cfg.method).Config, ssl_raw, "ssl")
    return cfg
