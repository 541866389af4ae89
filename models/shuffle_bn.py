"""MoCo-style shuffle-BN for a teacher forward: each rank normalises a random shard of the global batch.

With per-rank BatchNorm, the teacher's batch statistics would otherwise be computed over exactly the images whose
student crops sit on the same rank, which lets the student "cheat" through BN statistics (He et al., MoCo §3.3).
ReSSL's teacher uses it (KyleZheng1997/ReSSL @ 4d67daa ``network/ressl.py`` ``_batch_shuffle_ddp``).

Cost per call: two all-gathers (the teacher images, then the outputs) and one broadcast of a permutation. In one
process a permutation of the batch does not change BN statistics, so the forward is called directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from runtime import dist


@torch.no_grad()
def shuffled_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run ``fn`` on a random shard of the globally shuffled batch and return the outputs of this rank's samples.

    Args:
        fn: maps (B, ...) -> (B, D) with batch-dependent normalisation (a teacher in train mode).
        x: (B, ...) this rank's inputs; every rank must pass the same B.
    Returns:
        (B, D) outputs in the order of ``x``: row i is ``fn`` of sample i computed inside a random shard.
    """
    if not dist.is_dist():
        return fn(x)
    b, r = x.shape[0], dist.rank()
    x_all = dist.gather_no_grad(x)  # (W*B, ...)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)  # every rank uses rank 0's permutation
    out_all = dist.gather_no_grad(fn(x_all[perm[r * b:(r + 1) * b]]))  # row p of out_all is sample perm[p]
    inverse = torch.argsort(perm)  # sample s sits at row inverse[s]
    return out_all[inverse[r * b:(r + 1) * b]]
