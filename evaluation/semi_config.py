"""Typed hyperparameters of semi-supervised fine-tuning (``eval.py semi``), with the official recipes as presets.

Merge order (fixed): dataclass defaults <- the preset (``protocol=auto``: the checkpoint method's recipe, at 10 %
when ``train_perc=10`` is asked for, else at 1 %) <- each ``--config`` YAML <- the explicit CLI flags
(``--epochs``, ``--lr-backbone`` ...) <- trailing ``key=value`` overrides.

Presets (learning rates quoted for the preset's global batch; ``lr_scaling=linear`` multiplies them by batch/256):

==============  ===============================================================================================
cw_rgp-1pct     CW-RGP README (winci-ai/CW-RGP), the Barlow Twins ``evaluate.py`` command: ``--weights finetune
cw_rgp-10pct    --train-perc 1 --epochs 20 --lr-backbone 0.005 --lr-classifier 0.5 --weight-decay 0``; SGD momentum
                0.9, batch 256, cosine; the 10 % preset is the same command with ``--train-perc 10``
intl-1pct       INTL ``scripts/ep*_multi-crop_ema.sh`` + ``evaluate.py``/``cfg.py`` (winci-ai/INTL @ 18dd227):
intl-10pct      lr-classifier 0.2, lr-backbone 0.004 (x bs/256), SGD momentum 0.9, weight decay 1e-5 on every
                parameter (the script leaves ``--wd`` at its default), 20 epochs, MultiStepLR 60/80, which never
                fires in 20 epochs: the lr stays constant
mvmr-1pct       MV-MR ``configs/imagenet_semi_supervised.yaml`` + ``src/model/semi_supervised_module.py``
mvmr-10pct      (vkinakh/mv-mr @ 0c6261d): Adam lr 1e-4 on encoder and classifier alike, weight decay 1e-6,
                batch 128, 100 epochs, cosine
==============  ===============================================================================================

Shared by every preset: the whole backbone is trained (BatchNorm in train mode) together with a ``Linear(D, C)``
(init N(0, 0.01), bias 0) on its pooled features; train crops RandomResizedCrop(size, scale 0.08-1) + horizontal
flip; validation Resize(size * 256 / 224) + CenterCrop(size); top-1 / top-5 after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtime.config_loader import ConfigError, deep_merge, from_dict, load_yaml, parse_override

_CW_RGP = {"epochs": 20, "batch_size": 256, "lr_backbone": 0.005, "lr_classifier": 0.5, "weight_decay": 0.0,
           "optimizer": "sgd", "lr_scaling": "none", "schedule": "cosine"}
_INTL = {"epochs": 20, "batch_size": 256, "lr_backbone": 0.004, "lr_classifier": 0.2, "weight_decay": 1e-5,
         "optimizer": "sgd", "lr_scaling": "linear", "schedule": "step", "milestones": (60, 80)}
_MVMR = {"epochs": 100, "batch_size": 128, "lr_backbone": 1e-4, "lr_classifier": 1e-4, "weight_decay": 1e-6,
         "optimizer": "adam", "lr_scaling": "none", "schedule": "cosine"}

#: official semi-supervised recipes; keys are SemiConfig fields
SEMI_PROTOCOLS: dict[str, dict] = {f"{name}-{perc}pct": {**recipe, "train_perc": float(perc)}
                                   for name, recipe in (("cw_rgp", _CW_RGP), ("intl", _INTL), ("mvmr", _MVMR))
                                   for perc in (1, 10)}
#: the recipe family ``protocol=auto`` uses for each method (methods without their own: the CW-RGP/Barlow one)
METHOD_SEMI: dict[str, str] = {"intl": "intl", "cw_rgp": "cw_rgp", "mvmr": "mvmr"}


@dataclass
class SemiConfig:
    """Fine-tuning of backbone + linear classifier on a labelled subset (``eval.py semi``)."""

    protocol: str = "auto"  # preset name from SEMI_PROTOCOLS, or auto (see the module docstring)
    train_perc: float = 1.0  # percent of the training split drawn (class-balanced) when no subset file is given
    epochs: int = 20
    batch_size: int = 256  # global batch (split over ranks)
    lr_backbone: float = 0.005
    lr_classifier: float = 0.5
    lr_scaling: Literal["linear", "none"] = "none"  # linear: both lrs x global_batch / 256
    optimizer: Literal["sgd", "lars", "adam"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0  # on every parameter, as the official scripts do
    schedule: Literal["cosine", "step"] = "cosine"  # per-step cosine to 0, or x0.1 at each milestone epoch
    milestones: tuple[int, ...] = (60, 80)
    warmup_epochs: float = 0.0
    size: int = 0  # crop side; 0 = the checkpoint's data.eval_size
    resize: int = 0  # validation resize (shorter side); 0 = round(size * 256 / 224)
    train_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # train-crop kernel (torchvision's RRC default)
    eval_every: int = 1
    workers: int = -1  # loader workers per rank; -1 = the checkpoint's data.workers
    # backbone autocast; auto = bf16 where the checkpoint trained in bf16/fp16 on CUDA, else fp32 (no loss scaler)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    sync_bn: bool = False  # SyncBatchNorm over ranks (CUDA only); the official scripts keep per-GPU BatchNorm
    seed: int = 0  # subset draw and crop randomness

    def __post_init__(self) -> None:
        if not 0 < self.train_perc <= 100:
            raise ConfigError(f"train_perc: must be in (0, 100], got {self.train_perc}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ConfigError(f"epochs / batch_size / eval_every: must be >= 1, got {self.epochs} / "
                              f"{self.batch_size} / {self.eval_every}")
        if self.lr_backbone < 0 or self.lr_classifier <= 0:
            raise ConfigError(f"lr_backbone / lr_classifier: need >= 0 / > 0, got {self.lr_backbone} / "
                              f"{self.lr_classifier}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.size < 0 or self.resize < 0 or (self.size and self.resize and self.resize < self.size):
            raise ConfigError(f"size / resize: need 0 (auto) or resize >= size, got {self.size} / {self.resize}")
        lo, hi = self.train_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"train_scale: need 0 < min <= max <= 1, got {self.train_scale}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"milestones: must be increasing, got {self.milestones}")

    def crop_sizes(self, eval_size: int) -> tuple[int, int]:
        """(crop side, validation resize side), resolving the 0 = auto defaults against ``eval_size``."""
        size = self.size or eval_size
        return size, self.resize or round(size * 256 / 224)

    def peak_lrs(self, global_batch: int) -> tuple[float, float]:
        """(backbone, classifier) peak lr for ``global_batch``."""
        scale = global_batch / 256 if self.lr_scaling == "linear" else 1.0
        return self.lr_backbone * scale, self.lr_classifier * scale


def load_semi_config(method: str, files: list[str] | None = None, overrides: list[str] | None = None) -> SemiConfig:
    """Resolve the fine-tuning config for a checkpoint of ``method``; ConfigError names the bad key/value/file."""
    merged: dict = {}
    for layer in [load_yaml(p) for p in files or []] + [parse_override(o) for o in overrides or []]:
        merged = deep_merge(merged, layer)
    protocol = merged.get("protocol", "auto")
    if protocol == "auto":
        perc = 10 if _as_float(merged.get("train_perc", 1)) == 10 else 1
        protocol = f"{METHOD_SEMI.get(method, 'cw_rgp')}-{perc}pct"
    if protocol not in SEMI_PROTOCOLS:
        raise ConfigError(f"protocol: unknown preset {protocol!r}; allowed values: auto, {', '.join(SEMI_PROTOCOLS)}")
    merged = deep_merge({**SEMI_PROTOCOLS[protocol]}, merged)
    merged["protocol"] = protocol
    return from_dict(SemiConfig, merged)


def _as_float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
