"""Typed hyperparameters of the linear probes (``eval.py linear``), with per-method protocol presets.

Merge order (fixed): dataclass defaults <- the protocol preset (``protocol=auto`` picks the one of the checkpoint's
method) <- each ``--config`` YAML <- CLI ``key=value`` overrides (e.g. ``lr=0.1 epochs=10 fast.copies=2``).

The presets transcribe the official linear-evaluation recipes (``docs/methods/<m>.md``, section "Evaluation"):

=========  =====================================================================================================
ressl      ReSSL ``linear_eval.py``: SGD lr 0.3 (batch 256), momentum 0.9, wd 0, 100 epochs, per-step cosine to 0
dino       DINO/SCFS ``eval_linear.py`` (ResNet-50): SGD lr 0.01 per 256 (0.08 at batch 2048), wd 0, 100 epochs, cosine
resa       ReSA ``eval_linear.py``: SGD lr 10 per 256 (README, models pretrained at batch 256), steps at 60/80 (x0.1)
intl       INTL ``evaluate.py``: SGD lr 0.4 per 256, steps at 60/80 (x0.1)
cw_rgp     CW-RGP ``lincls.py``: LARS lr 0.1 per 256 (0.4 at batch 1024), cosine, batch 1024
mvmr       MV-MR ``--retrain``: Adam lr 1e-3, cosine to 0, 100 epochs (its README may report the online probe)
=========  =====================================================================================================

Shared by all: frozen backbone in eval mode, linear layer N(0, 0.01) with zero bias on the pooled features, train
crops RandomResizedCrop(size, 0.08-1) + flip, val Resize(size*256/224) + CenterCrop(size); best and last top-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from runtime.config_loader import ConfigError, bounded, deep_merge, from_dict, load_yaml, parse_override

#: official linear-probe recipes; keys are LinearConfig fields (lr is quoted for a global batch of 256)
PROTOCOLS: dict[str, dict] = {
    "ressl": {"lr": 0.3, "batch_size": 256, "schedule": "cosine", "optimizer": "sgd"},
    "dino": {"lr": 0.01, "batch_size": 2048, "schedule": "cosine", "optimizer": "sgd"},
    "resa": {"lr": 10.0, "batch_size": 256, "schedule": "step", "optimizer": "sgd"},
    "intl": {"lr": 0.4, "batch_size": 256, "schedule": "step", "optimizer": "sgd"},
    "cw_rgp": {"lr": 0.1, "batch_size": 1024, "schedule": "cosine", "optimizer": "lars"},
    "mvmr": {"lr": 1e-3, "batch_size": 256, "schedule": "cosine", "optimizer": "adam", "lr_scaling": "none"},
}


@dataclass
class FastProbeConfig:
    """``eval.py linear --fast``: train on cached frozen features instead of decoding images every epoch."""

    # augmented (RandomResizedCrop + flip) copies of each training image, in addition to its center crop; each copy
    # costs one pass of feature extraction. 0 = center crops only (fastest; typically within ~1 point on ImageNet)
    copies: int = bounded(0, ge=0)
    epochs: int = bounded(100, ge=1)  # passes over the cached training features
    batch_size: int = bounded(1024, ge=1)  # global; lr is scaled from the protocol's batch-256 value by lr_scaling
    # extra lr multipliers trained side by side as one wide matmul (DINOv2-style); 1.0 is the protocol lr. The
    # result reports the protocol head and the best head (selected on the validation split, like a grid search)
    lr_grid: tuple[float, ...] = bounded((1.0,), gt=0)
    cache_dtype: Literal["float32", "float16"] = "float32"  # float16 halves disk/device memory of the cache

    def __post_init__(self) -> None:
        if not self.lr_grid:
            raise ConfigError("fast.lr_grid: need at least one lr multiplier (1.0 = the protocol lr)")


@dataclass
class LinearConfig:
    """Standard linear probe over image loaders (``eval.py linear``); ``fast`` holds the cached-feature variant."""

    protocol: str = "auto"  # preset name from PROTOCOLS, or auto = the checkpoint method's official recipe
    epochs: int = bounded(100, ge=1)
    batch_size: int = bounded(256, ge=1)  # global batch (split over ranks)
    lr: float = bounded(0.3, gt=0)  # for a global batch of 256; the used lr is scaled by lr_scaling
    lr_scaling: Literal["linear", "none"] = "linear"
    optimizer: Literal["sgd", "lars", "adam"] = "sgd"
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)  # every official recipe uses 0 on the linear layer
    schedule: Literal["cosine", "step"] = "cosine"  # cosine: per step to 0; step: x0.1 at each milestone epoch
    milestones: tuple[int, ...] = bounded((60, 80), ge=1)
    warmup_epochs: float = bounded(0.0, ge=0)
    # "none" = the official BN-free linear layer; "bn" = BatchNorm1d(affine=False) before it (MAE's probe), which
    # makes the lr far less sensitive to the feature scale
    head_norm: Literal["none", "bn"] = "none"
    size: int = bounded(0, ge=8, also=(0,))  # crop side; 0 = the checkpoint's data.eval_size (224 for ImageNet recipes)
    resize: int = bounded(0, ge=8, also=(0,))  # validation resize (shorter side); 0 = round(size * 256 / 224)
    # RandomResizedCrop area range (torchvision default)
    train_scale: tuple[float, float] = bounded((0.08, 1.0), gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # train-crop resize kernel (torchvision loader)
    eval_every: int = bounded(1, ge=1)  # epochs between validations (the last epoch is always evaluated)
    workers: int = bounded(-1, ge=0, also=(-1,))  # loader workers per rank; -1 = the checkpoint's data.workers
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # backbone autocast; auto = the checkpoint's
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    fast: FastProbeConfig = field(default_factory=FastProbeConfig)

    def __post_init__(self) -> None:
        if self.size and self.resize and self.resize < self.size:
            raise ConfigError(f"size / resize: need resize >= size, got {self.size} / {self.resize}")
        if self.train_scale[0] > self.train_scale[1]:
            raise ConfigError(f"train_scale: need min <= max, got {self.train_scale}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones: must be increasing, got {self.milestones}")

    def crop_sizes(self, eval_size: int) -> tuple[int, int]:
        """(crop side, validation resize side), resolving the 0 = auto defaults against ``eval_size``."""
        size = self.size or eval_size
        return size, self.resize or round(size * 256 / 224)


def load_linear_config(method: str, files: list[str] | None = None, overrides: list[str] | None = None) -> LinearConfig:
    """Resolve the probe config for a checkpoint of ``method``; raises ConfigError naming the bad key/value/file."""
    layers = [load_yaml(p) for p in files or []] + [parse_override(o) for o in overrides or []]
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    protocol = merged.get("protocol", "auto")
    if protocol == "auto":
        from methods import METHODS  # the method class names its official probe (SSLMethod.eval_protocol)

        if method not in METHODS:
            raise ConfigError(f"protocol=auto: unknown method {method!r}; allowed values: {', '.join(sorted(METHODS))}")
        protocol = METHODS[method].eval_protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown preset {protocol!r}; allowed values: auto, {', '.join(PROTOCOLS)}")
    merged = deep_merge({**PROTOCOLS[protocol], "protocol": protocol}, merged)
    merged["protocol"] = protocol
    return from_dict(LinearConfig, merged)
