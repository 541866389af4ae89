"""[3]-[4] SCFS networks: ResNet stage maps from one backbone pass, the DINO head and the shallow heads.

Reference: skyoux/scfs @ 7bb7c37 ``models/scfs.py`` (``DINOShallowHead``, the student/teacher wrappers);
notes ``docs/methods/scfs.md`` ("Networks"). Stage maps come from timm's ``forward_intermediates`` (one backbone pass
returns the requested stage outputs and the final map, which is pooled exactly as ``backbone(x)`` pools it), so the
``backbone`` attribute stays a plain timm model whose ``forward`` gives the pooled features used for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.feature_search import pooled_query
from models.heads import MLPConfig, build_mlp
from models.multicrop import group_by_resolution


class DINOShallowHead(nn.Module):
    """Residual bottleneck on a stage map, global average pool, 2-layer BN MLP, L2 normalisation.

    ``conv1x1(C->b) BN ReLU conv3x3(b->b) BN ReLU conv1x1(b->C) BN`` + input, ReLU; pool; ``Linear(C->hidden) BN
    ReLU Linear(hidden->out) BN``; normalise. PyTorch default initialisation (as the official code).
    Input (N, C, H, W) -> unit vectors (N, out_dim).
    """

    def __init__(self, in_channels: int, bottleneck_dim: int = 256, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        b = bottleneck_dim
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
            nn.Conv2d(b, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels),
        )
        self.mlp = build_mlp(in_channels, MLPConfig(hidden_dim, out_dim, layers=2, norm="bn", act="relu",
                                                    last_norm=True, last_norm_affine=True, bias=True))

    def forward(self, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        y = F.relu(x + self.block(x))
        return F.normalize(self.mlp(y.mean(dim=(-2, -1))), dim=-1, eps=eps)


def stage_indices(backbone: nn.Module, stages: Sequence[int]) -> list[int]:
    """Indices into ``backbone.feature_info`` of the ResNet stages ``layer{k}`` for k in ``stages``.

    Raises:
        ValueError: the backbone has no such stage (e.g. a ViT); the message lists what it has.
    """
    info = getattr(backbone, "feature_info", None)
    names = [f["module"] for f in info] if isinstance(info, list) else []
    missing = [k for k in stages if f"layer{k}" not in names]
    if missing or not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"backbone {type(backbone).__name__} has no ResNet stages "
                         f"{', '.join(f'layer{k}' for k in missing or stages)} (its feature stages: {names or 'none'})")
    return [names.index(f"layer{k}") for k in stages]


@dataclass
class SCFSViews:
    """Outputs of an :class:`SCFSNet` over V crops of B images.

    Attributes:
        logits: (V, B, K) DINO-head logits.
        shallow: per stage (V, B, D) shallow-head unit vectors.
        pooled: per stage (V, B, C_k) spatial means of the stage maps, detached (feature-search queries).
        first_maps: per stage (B, C_k, H_k, W_k) stage maps of crop 0 (the searched global crop).
    """

    logits: torch.Tensor
    shallow: list[torch.Tensor]
    pooled: list[torch.Tensor]
    first_maps: list[torch.Tensor]


class SCFSNet(nn.Module):
    """timm ResNet ``backbone`` + DINO ``head`` on the pooled feature + one :class:`DINOShallowHead` per stage."""

    def __init__(self, backbone: nn.Module, head: nn.Module, stages: Sequence[int] = (2, 3, 4),
                 bottleneck_dim: int = 256, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.stages = tuple(stages)
        self._indices = stage_indices(backbone, self.stages)
        chans = [backbone.feature_info[i]["num_chs"] for i in self._indices]
        self.shallow_heads = nn.ModuleList(DINOShallowHead(c, bottleneck_dim, hidden_dim, out_dim) for c in chans)

    def compile_backbone(self) -> None:
        """``torch.compile`` the entry point SCFS actually uses (``forward_stages``, not ``backbone.forward``)."""
        self.forward_stages = torch.compile(self.forward_stages, dynamic=False)

    def forward_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One backbone pass. (N, 3, H, W) -> pooled (N, D_backbone), per stage map (N, C_k, H_k, W_k)."""
        final, maps = self.backbone.forward_intermediates(x, indices=self._indices)
        return self.backbone.forward_head(final, pre_logits=True), maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(N, 3, H, W) -> logits (N, K), per stage shallow outputs (N, D), per stage maps (N, C_k, H_k, W_k)."""
        pooled, maps = self.forward_stages(x)
        return self.head(pooled), [h(m) for h, m in zip(self.shallow_heads, maps)], maps

    def forward_views(self, views: list[torch.Tensor]) -> SCFSViews:
        """Run V crops (B, 3, H_v, W_v), one backbone pass per resolution; see :class:`SCFSViews`."""
        logits, shallow, pooled, first_maps = [], [], [], []
        n_views, batch = len(views), views[0].shape[0]
        for a, b in group_by_resolution(views):
            lg, sh, maps = self(torch.cat(views[a:b], dim=0))
            logits.append(lg)
            shallow.append(sh)
            pooled.append([pooled_query(m) for m in maps])
            if a == 0:
                first_maps = [m[:batch] for m in maps]
        n_stages = len(self.stages)

        def stack(parts: list[torch.Tensor]) -> torch.Tensor:  # group-major (N_g*B, ...) pieces -> (V, B, ...)
            return torch.cat(parts, dim=0).unflatten(0, (n_views, batch))

        return SCFSViews(
            logits=stack(logits),
            shallow=[stack([s[k] for s in shallow]) for k in range(n_stages)],
            pooled=[stack([p[k] for p in pooled]) for k in range(n_stages)],
            first_maps=first_maps,
        )
