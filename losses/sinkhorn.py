"""Sinkhorn-Knopp balancing of a score matrix into a (scaled) doubly-stochastic assignment, in fp32.

Used by ReSA (self-assignment over the batch). The rows of the score matrix may be split over ranks (each rank holds
the rows of its local samples, all ranks hold the same columns); the sums that run over rows are then all-reduced,
which makes the stacked per-rank results identical to the single-process result on the full matrix.

Letters: R local rows (e.g. online samples on this rank), C columns (the "prototype" axis, e.g. gathered momentum
samples), N = R * world_size rows in total.
"""

from __future__ import annotations

import torch

from losses.common import at_least_fp32, fp32_island
from runtime import dist


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor,
    eps: float = 0.05,
    n_iters: int = 3,
    distributed: bool = False,
) -> torch.Tensor:
    """Balance ``exp(scores / eps)`` so that every row sums to 1 and every column to about ``N / C``.

    Each iteration first normalises the columns to ``1 / C`` of the total mass, then the rows to ``1 / N`` of it
    (the rows are normalised last, so they sum to exactly 1 on return). This is SwAV's ``distributed_sinkhorn``
    written with the sample axis as rows.

    Args:
        scores: (R, C) similarity scores (e.g. cosine similarities of local rows against all columns).
        eps: entropic regularisation (temperature of the exponent); smaller = sharper assignment.
        n_iters: number of (column, row) normalisation rounds.
        distributed: the rows are split over ranks: reduce the column maxima and sums over ranks, and count
            ``N = R * world_size`` rows (all ranks must pass the same R).
    Returns:
        (R, C) fp32 assignment (fp64 for fp64 scores); rows sum to 1.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects a (rows, cols) matrix, got shape {tuple(scores.shape)}")
    if eps <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn_knopp needs eps > 0 and n_iters >= 1, got eps={eps}, n_iters={n_iters}")
    reduce = dist.all_reduce_sum if distributed else (lambda t: None)
    n_rows = scores.shape[0] * (dist.world_size() if distributed else 1)
    n_cols = scores.shape[1]
    with fp32_island(scores.device.type):
        scores = at_least_fp32(scores)
        # Subtract each column's maximum (over the rows of all ranks) inside the exponent: exp cannot overflow and no
        # column vanishes. The shift is a per-column factor, and the usual first step (divide by the total mass) a
        # global one; the first column normalisation removes both exactly, so neither changes the result.
        col_max = scores.amax(dim=0, keepdim=True)  # (1, C)
        if distributed:
            col_max = dist.gather_no_grad(col_max).amax(dim=0, keepdim=True)  # (W, C) -> (1, C)
        q = torch.exp((scores - col_max) / eps)  # (R, C)
        for _ in range(n_iters):
            col = q.sum(dim=0)  # (C,) mass of each column over all rows (of all ranks)
            reduce(col)
            q /= col * n_cols
            q /= q.sum(dim=1, keepdim=True) * n_rows  # rows are local: no communication
        return q * n_rows
