"""Choose whether the last BatchNorm of every residual block starts at gamma = 0 ("zero-init residual").

timm's ResNets zero-init it by default (``zero_init_last=True``); torchvision's do not. Recipes differ: ReSSL uses
torchvision's default (off), ReSA turns it on. No-op for backbones without such blocks (e.g. ViTs).
"""

from __future__ import annotations

import torch
from torch import nn


def _last_norm(block: nn.Module) -> nn.Module | None:
    """The BN closing the residual branch of a timm ResNet block (``bn3`` of Bottleneck, ``bn2`` of BasicBlock)."""
    for name in ("bn3", "bn2"):
        m = getattr(block, name, None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m
    return None


@torch.no_grad()
def set_zero_init_residual(backbone: nn.Module, enabled: bool) -> int:
    """Set the closing BN weight of every residual block to 0 (``enabled``) or 1 (BN's default init).

    Returns:
        the number of blocks changed (0 for backbones without ResNet-style blocks).
    """
    count = 0
    for m in backbone.modules():
        if not hasattr(m, "zero_init_last"):
            continue
        bn = _last_norm(m)
        if bn is None or bn.weight is None:
            continue
        bn.weight.fill_(0.0 if enabled else 1.0)
        count += 1
    return count
