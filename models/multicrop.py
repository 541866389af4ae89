"""[3] One backbone pass per crop resolution (DINO's multi-crop wrapper idea)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_by_resolution(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Split consecutive views into runs of equal spatial size.

    Args:
        views: list of (B, C, H_v, W_v) tensors.
    Returns:
        list of (start, end) index ranges into ``views``; each run shares H and W.
    """
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


def forward_multicrop(fn: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` once per resolution group on the concatenated crops of that group.

    Args:
        fn: maps (N, C, H, W) -> (N, D).
        views: V tensors of shape (B, C, H_v, W_v), consecutive equal-size views grouped.
    Returns:
        (V*B, D) outputs, view-major (rows ``v*B:(v+1)*B`` belong to view ``v``).
    """
    outs = [fn(torch.cat(views[a:b], dim=0)) for a, b in group_by_resolution(views)]
    return torch.cat(outs, dim=0)
