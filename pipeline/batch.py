"""The batch every loader yields and every training step consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A multi-crop batch.

    Attributes:
        views: one tensor per crop, globals first, in the order of ``DataConfig.expanded_views()``.
            Before device augmentation: uint8, (B, 3, H_v, W_v), RGB, values 0..255, crop+flip applied.
            After device augmentation (``augmented=True``): float (or autocast dtype), normalised, (B, 3, H_v, W_v),
            possibly channels-last.
        labels: (B,) int64 class indices (unused by SSL, kept for monitoring and kNN).
        indices: (B,) int64 dataset indices (for debugging sample order and exact resume checks).
        n_global: how many of ``views`` are global crops.
        augmented: whether colour/blur/solarize/normalise have been applied already.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    n_global: int
    augmented: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = True) -> Batch:
        return Batch(
            views=[v.to(device, non_blocking=non_blocking) for v in self.views],
            labels=self.labels.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
            n_global=self.n_global,
            augmented=self.augmented,
        )
