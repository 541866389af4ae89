"""Frozen-backbone feature extraction over an ImageFolder (resize + center-crop), sharded across ranks."""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from pipeline.pil_transforms import build_eval_transform
from runtime import dist
from runtime.config_loader import ConfigError


def image_folder(root: str, size: int, what: str) -> ImageFolder:
    if not os.path.isdir(root):
        raise ConfigError(f"{what}: {root!r} is not a directory (expected an ImageFolder tree <root>/<class>/<image>)")
    try:
        return ImageFolder(root, transform=build_eval_transform(size))
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"{what}: {root!r} is not a usable ImageFolder: {e}") from None


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, device: torch.device, batch_size: int = 128, workers: int = 2,
                     autocast_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image, in dataset order, on every rank.

    Each rank embeds ``rank::world`` (padded to equal length), then the shards are gathered and re-interleaved.
    Returns (features (N, D) float32 on ``device``, labels (N,) int64).
    """
    was_training = backbone.training
    backbone.eval()
    n, w, r = len(dataset), dist.world_size(), dist.rank()
    per_rank = (n + w - 1) // w
    mine = [min(i, n - 1) for i in range(r, per_rank * w, w)]
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, num_workers=workers, shuffle=False)
    feats, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            f = backbone(x)
        feats.append(f.float())
        labels.append(y.to(device))
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    f_all, y_all = dist.gather_no_grad(f), dist.gather_no_grad(y)
    # gathered layout is rank-major: row (rr * per_rank + j) holds sample (j * w + rr)
    order = torch.arange(per_rank * w, device=f_all.device).view(w, per_rank).T.reshape(-1)
    return f_all[order][:n], y_all[order][:n]
