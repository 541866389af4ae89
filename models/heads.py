"""[4] Projection / prediction heads built from config, and DINO's weight-normalised prototype head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MLPConfig:
    """An MLP ``in -> hidden x (layers-1) -> out``.

    ``norm`` after every hidden linear (and after the last one when ``last_norm``); ``act`` after every hidden
    layer. ``bias`` for all linears (set False for MV-MR's bias-free projector).
    """

    hidden_dim: int = 2048
    out_dim: int = 256
    layers: int = 3
    norm: str = "none"  # 'none' | 'bn'
    act: str = "gelu"  # 'gelu' | 'relu'
    last_norm: bool = False  # BN (affine=False) after the last linear, as in several whitening methods
    last_norm_affine: bool = True
    bias: bool = True


def _act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}; allowed values: 'gelu', 'relu'")


def build_mlp(in_dim: int, cfg: MLPConfig) -> nn.Sequential:
    """Build the MLP described by ``cfg``. Input (B, in_dim) -> output (B, out_dim)."""
    if cfg.layers < 1:
        raise ValueError(f"MLP layers must be >= 1, got {cfg.layers}")
    if cfg.norm not in ("none", "bn"):
        raise ValueError(f"unknown MLP norm {cfg.norm!r}; allowed values: 'none', 'bn'")
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(cfg.layers - 1):
        mods.append(nn.Linear(dim, cfg.hidden_dim, bias=cfg.bias))
        if cfg.norm == "bn":
            mods.append(nn.BatchNorm1d(cfg.hidden_dim))
        mods.append(_act(cfg.act))
        dim = cfg.hidden_dim
    mods.append(nn.Linear(dim, cfg.out_dim, bias=cfg.bias))
    if cfg.last_norm:
        mods.append(nn.BatchNorm1d(cfg.out_dim, affine=cfg.last_norm_affine))
    return nn.Sequential(*mods)


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """DINO's head init: linear weights trunc-normal(std), biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (no bias).

    Input (B, in_dim) -> logits (B, out_dim). With ``norm_last_layer`` the weight-norm gain is fixed to 1, so each
    logit is the cosine between the bottleneck and a prototype (in [-1, 1]). The prototype layer's parameters carry
    ``last_layer`` in their names so the optimiser can freeze them for the first epoch(s).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        cfg = MLPConfig(hidden_dim, bottleneck_dim, layers, "bn" if use_bn else "none", "gelu")
        self.mlp = build_mlp(in_dim, cfg)
        trunc_normal_init(self.mlp)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)
