"""A backbone with heads, run over multi-crop views (one backbone pass per resolution)."""

from __future__ import annotations

import torch
from torch import nn

from models.multicrop import forward_multicrop


class BackboneWithHead(nn.Module):
    """``head(backbone(x))`` over a list of crops.

    ``forward(views)`` takes V tensors (B, 3, H_v, W_v) and returns ``(V, B, D_head)``; ``embed(views)`` returns the
    pooled backbone features ``(V, B, D_backbone)`` as well, for methods that use both.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def embed(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (features (V, B, D_backbone), head outputs (V, B, D_head))."""
        feats = forward_multicrop(self.backbone, views)
        out = self.head(feats)
        n_views = len(views)
        return feats.unflatten(0, (n_views, -1)), out.unflatten(0, (n_views, -1))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        return self.embed(views)[1]
