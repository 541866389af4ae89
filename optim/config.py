"""Typed configuration of the optimiser and its schedules (``optim:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtime.config_loader import (
    bounded,
)


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
