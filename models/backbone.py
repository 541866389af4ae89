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
    model = timm.create_model(cfg.backbone, **kwargs)
    if cfg.stem == "cifar":
        cifar_stem(model, cfg.backbone)
    return model


def cifar_stem(model: nn.Module, name: str) -> None:
    """Replace a timm ResNet's 7x7/2 conv + 3x3/2 max-pool by a 3x3/1 conv without pooling, in place.

    The small-image ResNets of lightly's, solo-learn's and the INTL/CW-RGP/MV-MR CIFAR codes use this stem, which
    keeps a 32 px input at 32x32 into ``layer1`` (the ImageNet stem leaves 8x8, and 1x1 after ``layer4``). The new
    conv is initialised as timm initialises its convs (Kaiming normal, fan-out, ReLU gain).
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.Module):
        raise ConfigError(f"model.stem=cifar: {name!r} is not a ResNet with a single-conv stem (conv1 + maxpool); "
                          "use model.stem=imagenet")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def feature_dim(backbone: nn.Module) -> int:
    """Width D of the pooled features the backbone returns (timm's ``num_features``)."""
    return int(backbone.num_features)


