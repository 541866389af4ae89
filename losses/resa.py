"""ReSA loss: a Sinkhorn self-assignment of the batch (from encoder outputs of the weak view) is the soft target of
a temperature softmax over cross-view embedding similarities.

Weng et al., "Clustering Properties of Self-Supervised Learning", ICML 2025 (arXiv 2501.18452).
Reference: winci-ai/resa @ e7869d1 (``method/resa.py``, ``method/base.py``); notes ``docs/methods/resa.md`` ("Loss").

Letters: V online views, M momentum views (2: the weak view 0 and the first strong view 1), B_l per-rank batch,
B = B_l * world_size global batch, D embedding width, E encoder width. ``n(x)`` is row-wise L2 normalisation::

    A      = sinkhorn(n(h) n(h_bar)^T, eps=0.05, 3 iters)           (B_l, B), rows sum to 1, no gradient
    P^{qv} = softmax_j(n(z^q)_i . n(z_bar^v)_j / tau)               tau = 0.4
    L      = mean over pairs (q, v), q != v, of  mean_i sum_j -A_ij log P^{qv}_ij

``h`` is the online encoder output of view 0 (detached), ``h_bar`` / ``z_bar`` the momentum encoder output of view 0
and momentum embeddings of views 0 and 1, gathered over ranks without gradient. Online rows stay local, so each
rank's loss is the mean over its own rows; DDP's gradient average makes the step equal to the global-batch one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import at_least_fp32, fp32_island
from losses.kernels import fused_for, resa_cross_entropy_fused, self_assignment_fused
from losses.sinkhorn import sinkhorn_knopp
from runtime import dist


@torch.no_grad()
def self_assignment(h: torch.Tensor, h_bar: torch.Tensor, eps: float, n_iters: int,
                    distributed: bool = False) -> torch.Tensor:
    """Sinkhorn assignment of online samples (rows) to momentum samples (columns) from encoder outputs.

    Args:
        h: (B_l, E) online encoder outputs of view 0 (local rows).
        h_bar: (B, E) momentum encoder outputs of view 0, gathered over ranks.
        eps: Sinkhorn entropic regularisation (0.05).
        n_iters: Sinkhorn iterations (3).
        distributed: rows are split over ranks (all-reduce the Sinkhorn sums over rows).
    Returns:
        (B_l, B) fp32 assignment A; each row sums to 1.
    """
    scores = F.normalize(at_least_fp32(h), dim=-1) @ F.normalize(at_least_fp32(h_bar), dim=-1).T
    return sinkhorn_knopp(scores, eps, n_iters, distributed=distributed)


def resa_cross_entropy(z: torch.Tensor, z_bar: torch.Tensor, assignment: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Mean over view pairs (q, v), q != v, of the soft cross-entropy between A and the relation softmax.

    Args:
        z: (V, B_l, D) online embeddings (predictor outputs), unnormalised; views in data order, view q of z and
            view v of z_bar are the same crop when q == v (those pairs are skipped).
        z_bar: (M, B, D) momentum embeddings (gathered), unnormalised, M <= V.
        assignment: (B_l, B) target A (no gradient).
        temperature: tau.
    Returns:
        scalar fp32 loss.
    """
    n_v, n_m = z.shape[0], z_bar.shape[0]
    zn = F.normalize(at_least_fp32(z), dim=-1)
    zbn = F.normalize(at_least_fp32(z_bar), dim=-1)
    # logits[q, v, i, j] = n(z^q_i) . n(z_bar^v_j) / tau
    logits = torch.einsum("qid,vjd->qvij", zn, zbn) / temperature
    ce = -(assignment * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean(dim=-1)  # (V, M)
    mask = torch.arange(n_v, device=z.device)[:, None] != torch.arange(n_m, device=z.device)[None, :]
    return ce[mask].mean()


def _gather_views(x: torch.Tensor) -> torch.Tensor:
    """(M, B_l, D) -> (M, B, D): all-gather along the batch axis, without gradient."""
    return dist.gather_no_grad(x.transpose(0, 1).contiguous()).transpose(0, 1)


class ReSALoss(nn.Module):
    """Stateless ReSA loss; holds the hyper-parameters and does the momentum-side gather (``gather=True``)."""

    def __init__(self, temperature: float = 0.4, sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3,
                 gather: bool = True):
        super().__init__()
        if temperature <= 0 or sinkhorn_eps <= 0 or sinkhorn_iters < 1:
            raise ValueError(f"need temperature > 0, sinkhorn_eps > 0, sinkhorn_iters >= 1; got {temperature}, "
                             f"{sinkhorn_eps}, {sinkhorn_iters}")
        self.temperature = temperature
        self.sinkhorn_eps = sinkhorn_eps
        self.sinkhorn_iters = sinkhorn_iters
        self.gather = gather

    def forward(self, z: torch.Tensor, h: torch.Tensor, z_bar: torch.Tensor,
                h_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            z: (V, B_l, D) online embeddings of every view (with gradient).
            h: (B_l, E) online encoder output of view 0 (detached here).
            z_bar: (M, B_l, D) local momentum embeddings of views 0..M-1 (no gradient).
            h_bar: (B_l, E) local momentum encoder output of view 0 (no gradient).
        Returns:
            (scalar fp32 loss, (B_l, B) assignment A) - A is returned for monitoring.
        """
        if z.ndim != 3 or z_bar.ndim != 3 or z.shape[1:] != z_bar.shape[1:] or z_bar.shape[0] > z.shape[0]:
            raise ValueError(f"expected z (V, B, D) and z_bar (M <= V, B, D), got {tuple(z.shape)}, "
                             f"{tuple(z_bar.shape)}")
        if h.shape != h_bar.shape or h.shape[0] != z.shape[1]:
            raise ValueError(f"expected h and h_bar (B={z.shape[1]}, E), got {tuple(h.shape)}, {tuple(h_bar.shape)}")
        distributed = self.gather and dist.is_dist()
        z_bar = z_bar.detach()
        h_bar = h_bar.detach()
        if distributed:
            z_bar, h_bar = _gather_views(z_bar), dist.gather_no_grad(h_bar)
        with fp32_island(z.device.type):
            if fused_for("resa", z.device) and torch.float64 not in (z.dtype, h.dtype, z_bar.dtype, h_bar.dtype):
                assignment = self_assignment_fused(h.detach(), h_bar, self.sinkhorn_eps, self.sinkhorn_iters,
                                                   distributed)
                return resa_cross_entropy_fused(z, z_bar, assignment, self.temperature), assignment
            assignment = self_assignment(h.detach(), h_bar, self.sinkhorn_eps, self.sinkhorn_iters, distributed)
            return resa_cross_entropy(z, z_bar, assignment, self.temperature), assignment
