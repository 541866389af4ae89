"""Frozen-backbone feature extraction, sharded across ranks and gathered back into dataset order.

* :func:`embed_split`: every image of an :class:`evaluation.eval_loaders.EvalSplit` (resize + center-crop;
  ImageFolder or .beton) -> (N, D) features in dataset order on every rank.
* :func:`embed_loader_epoch`: one epoch of an augmenting loader (random-resized-crop copies for the fast probe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from evaluation.eval_loaders import EvalSplit, normalize, rank_indices
from runtime import dist


@dataclass
class FrozenBackbone:
    """A backbone in eval mode plus its input contract: uint8 images -> normalised (channels-last) -> features.

    ``autocast_dtype`` None = fp32. Features never carry gradients; returns float32 (B, D). The module is put in
    eval mode (``release()`` restores its previous mode); its parameters are not modified.
    """

    module: nn.Module
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        self._was_training = self.module.training
        self.module = self.module.to(self.device).eval()

    def release(self) -> None:
        """Give the module back in the train/eval mode it had (e.g. the trainer's student after an in-run kNN)."""
        self.module.train(self._was_training)

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.module, "num_features", 0)) or self._probe_dim()

    def _probe_dim(self) -> int:
        with torch.no_grad():
            return int(self(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[1])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, D) pooled features."""
        x = normalize(images, self.mean, self.std, self.device, self.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.module(x).float()


def gather_in_order(local: torch.Tensor, n: int) -> torch.Tensor:
    """All-gather the padded per-rank shards of :func:`rank_indices` and restore dataset order: (n, ...)."""
    w = dist.world_size()
    gathered = dist.gather_no_grad(local.contiguous())
    per_rank = gathered.shape[0] // w
    # gathered layout is rank-major: row (rr * per_rank + j) holds sample (j * w + rr)
    order = torch.arange(per_rank * w, device=gathered.device).view(w, per_rank).T.reshape(-1)
    return gathered[order][:n]


@torch.no_grad()
def embed_split(frozen: FrozenBackbone, split: EvalSplit, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of ``split`` in dataset order, on every rank.

    Each rank embeds samples ``rank::world`` (padded to equal length), then the shards are gathered.
    Returns (features (N, D) float32, labels (N,) int64), both on ``frozen.device``.
    """
    mine = rank_indices(split.n, dist.rank(), dist.world_size(), pad=True)
    feats, labels = [], []
    for images, y in split.batches(mine, batch_size):
        feats.append(frozen(images))
        labels.append(y.to(frozen.device))
    return gather_in_order(torch.cat(feats), split.n), gather_in_order(torch.cat(labels), split.n)


@torch.no_grad()
def embed_loader_epoch(frozen: FrozenBackbone, loader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one epoch of a training-style loader (``epoch_iter`` yielding Batch, ``views[0]`` uint8).

    Every rank yields the same number of full batches, so the shards are simply concatenated.
    Returns (features (M, D) float32, labels (M,) int64) on ``frozen.device``; M = len(loader) * batch * world.
    """
    feats, labels = [], []
    for batch in loader.epoch_iter(epoch):
        feats.append(frozen(batch.views[0]))
        labels.append(batch.labels.to(frozen.device))
    return dist.gather_no_grad(torch.cat(feats)), dist.gather_no_grad(torch.cat(labels))
