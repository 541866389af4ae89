"""[3] Backbones come only from timm; no vendored network code."""

from __future__ import annotations

import timm
from torch import nn

from models.config import ModelConfig
from runtime.config_loader import ConfigError


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """``timm.create_model(cfg.backbone, num_classes=0)`` returning pooled features (B, D).

    ViTs are created with ``dynamic_img_size=True`` so the 96 px local crops pass through the same
    weights (position embeddings are interpolated), as DINO does. No pretrained weights are loaded:
    nothing is downloaded at run time.
    """
    kwargs: dict = {"num_classes": 0, "pretrained": False}
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.backbone.startswith(("vit_", "deit_", "eva", "beit")):
        kwargs["dynamic_img_size"] = True
    if not timm.is_model(cfg.backbone):
        close = timm.list_models(f"*{cfg.backbone.split('_')[0]}*")[:8]
        raise ConfigError(f"model.backbone: unknown timm model {cfg.backbone!r}; similar names: {', '.join(close)}")
    return timm.create_model(cfg.backbone, **kwargs)


def feature_dim(backbone: nn.Module) -> int:
    """Width D of the pooled features the backbone returns (timm's ``num_features``)."""
    return int(backbone.num_features)


