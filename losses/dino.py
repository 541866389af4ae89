"""DINO loss: multi-crop soft cross-entropy against a centred, sharpened teacher (Caron et al. 2021).

Reference: facebookresearch/dino @ 7c446df ``main_dino.py::DINOLoss``; method notes ``docs/methods/dino.md`` ("Loss").

Letters: T teacher (global) crops, S student crops (globals first, S >= T), B per-rank batch, K prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losses.center import CenteredLoss, batch_column_sum
from losses.common import at_least_fp32, fp32_island
from losses.kernels import soft_ce_fused, use_fused
from losses.sinkhorn import sinkhorn_knopp
from runtime import dist


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((t - c) / temp) in fp32 (fp64 stays fp64). (T, B, K), (K,) -> (T, B, K)."""
    return F.softmax((at_least_fp32(teacher_logits) - center) / temp, dim=-1)


def sinkhorn_teacher_probs(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp centering: all teacher crops of the global batch are the rows of one assignment.

    Rows are split over ranks (the per-prototype sums over rows are all-reduced), so 2 ranks equal 1 process on the
    concatenated batch.
    (T, B, K) -> (T, B, K) fp32 probabilities, each row summing to 1, the prototypes pushed towards 1/K of the mass
    each (exactly balanced only in the limit of many iterations).
    """
    n_t, b, k = teacher_logits.shape
    rows = teacher_logits.transpose(0, 1).reshape(b * n_t, k)  # sample-major: each rank owns whole samples
    q = sinkhorn_knopp(rows, temp, n_iters, distributed=dist.is_dist())
    return q.view(b, n_t, k).transpose(0, 1)


def multicrop_cross_entropy(student_logits: torch.Tensor, t_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over (teacher crop t, student crop s != t) pairs of ``mean_b CE(P_t, log_softmax(s / tau_s))``.

    Args:
        student_logits: (S, B, K), crops ordered globals first, so crop ``i < T`` is the same image as
            teacher crop ``i``.
        t_probs: (T, B, K) teacher probabilities (no gradient).
        student_temp: tau_s.
    Returns:
        scalar loss (fp32).
    """
    n_t, n_s = t_probs.shape[0], student_logits.shape[0]
    log_q = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)
    # ce[t, s] = - mean_b sum_k P[t,b,k] log q[s,b,k]
    ce = -torch.einsum("tbk,sbk->ts", t_probs, log_q) / t_probs.shape[1]
    mask = torch.ones(n_t, n_s, dtype=torch.bool, device=ce.device)
    mask[torch.arange(n_t), torch.arange(n_t)] = False  # a crop is never its own target
    return ce[mask].sum() / mask.sum()


class DINOLoss(CenteredLoss):
    """Multi-crop DINO loss holding the (K,) center; the center update is split into an async reduce and an apply.

    Call order per step: ``loss, teacher_sum = loss_and_teacher_sum(...)`` ->
    ``reduce_center_update(teacher_logits, teacher_sum)`` (starts the all-reduce, overlapping backward) -> after the
    optimiser step ``apply_center_update()``. ``forward`` returns the loss alone.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center"):
        super().__init__((out_dim,), center_momentum)
        if centering not in ("center", "sinkhorn"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn', got {centering!r}")
        self.centering = centering
        self.student_temp = student_temp

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                with_teacher_sum: bool = False):
        """student_logits (S, B, K), teacher_logits (T, B, K) -> scalar loss (the center from before this step).

        With ``with_teacher_sum``: (loss, the teacher logits' (K,) fp32 column sum where the fused kernel computed it
        in its pass over them, else None); hand it to ``reduce_center_update`` so the logits are not read again.
        """
        loss, teacher_sum = self._loss_and_teacher_sum(student_logits, teacher_logits, teacher_temp)
        return (loss, teacher_sum) if with_teacher_sum else loss

    def loss_and_teacher_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward(..., with_teacher_sum=True)``, called through the module so that forward hooks (the benchmark's
        loss timer) see it."""
        return self(student_logits, teacher_logits, teacher_temp, with_teacher_sum=True)

    def _loss_and_teacher_sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if student_logits.shape[-1] != self.center.shape[0] or teacher_logits.shape[-1] != self.center.shape[0]:
            raise ValueError(f"logit width must be {self.center.shape[0]}, got {tuple(student_logits.shape)}, "
                             f"{tuple(teacher_logits.shape)}")
        with fp32_island(student_logits.device.type):
            if self.centering == "sinkhorn":  # the center is still tracked (a statistic) but not used
                probs = sinkhorn_teacher_probs(teacher_logits.detach(), teacher_temp)
                return multicrop_cross_entropy(student_logits, probs, self.student_temp), None
            if use_fused() and student_logits.dtype != torch.float64 and teacher_logits.dtype != torch.float64:
                return soft_ce_fused(student_logits, teacher_logits.detach(), self.center, self.student_temp,
                                     teacher_temp)
            probs = teacher_probs(teacher_logits.detach(), self.center, teacher_temp)
            return multicrop_cross_entropy(student_logits, probs, self.student_temp), None

    @torch.no_grad()
    def reduce_center_update(self, teacher_logits: torch.Tensor, teacher_sum: torch.Tensor | None = None) -> None:
        """Start the cross-rank sum of the teacher logits' batch sum. teacher_logits (T, B, K); teacher_sum: their
        (K,) column sum when the caller has it (``loss_and_teacher_sum``), else it is computed here."""
        total = batch_column_sum(teacher_logits) if teacher_sum is None else teacher_sum
        self.start_center_reduce(total, math.prod(teacher_logits.shape[:-1]))
