"""SCFS shallow losses (Song et al., ICCV 2023): DINO-style self-distillation on intermediate ResNet stages.

Reference: skyoux/scfs @ 7bb7c37 ``models/scfs.py::DINOShallowLoss`` and ``main_scfs.py`` (loss sum);
method notes ``docs/methods/scfs.md`` ("Losses"). The final-head term is :class:`losses.dino.DINOLoss`.

Per stage k, with ``u`` the unit-vector shallow-head outputs and a per-stage center ``c_k``::

    L^g_k = mean_{t != s} mean_b CE( softmax((u^t_k(g_t) - c_k) / T), log_softmax(u^s_k(g_s) / tau) )   global pairs
    L^l_k = mean_i mean_b CE( softmax(v^t_{k,i} / T), log_softmax(u^s_k(l_i) / tau) )   searched targets, NOT centred
    L     = sum_k (L^g_k + L^l_k) / 2
    c_k  <- m c_k + (1 - m) * mean over ranks, global crops and images of u^t_k(g)     (only the global teacher outputs)

Letters: G global crops, L local crops, B per-rank batch, D shallow output width, K stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from losses.center import CenteredLoss, batch_column_sum
from losses.common import at_least_fp32, fp32_island
from losses.dino import multicrop_cross_entropy, teacher_probs


def shallow_global_loss(student_global: torch.Tensor, teacher_global: torch.Tensor, center: torch.Tensor,
                        teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Cross-view loss between global crops with centred, sharpened teacher targets.

    Args:
        student_global: (G, B, D) student shallow outputs of the global crops.
        teacher_global: (G, B, D) teacher shallow outputs of the same crops (no gradient).
        center: (D,) this stage's center (the value from before this step's update).
    Returns:
        scalar (fp32): mean over the G(G-1) pairs t != s (= 1/2 [CE(t1, s2) + CE(t2, s1)] for G = 2).
    """
    probs = teacher_probs(teacher_global.detach(), center, teacher_temp)
    return multicrop_cross_entropy(student_global, probs, student_temp)


def shallow_local_loss(student_local: torch.Tensor, searched_teacher: torch.Tensor, teacher_temp: float,
                       student_temp: float) -> torch.Tensor:
    """Each local crop against the teacher output on its own searched map; targets are not centred.

    Args:
        student_local: (L, B, D) student shallow outputs of the local crops.
        searched_teacher: (L, B, D) teacher shallow outputs on the searched maps (crop i, image b <-> row (i, b)).
    Returns:
        scalar (fp32): ``mean_i mean_b CE``.
    """
    if student_local.shape != searched_teacher.shape:
        raise ValueError(f"shallow_local_loss: student {tuple(student_local.shape)} and searched targets "
                         f"{tuple(searched_teacher.shape)} must have the same (L, B, D) shape")
    probs = F.softmax(at_least_fp32(searched_teacher.detach()) / teacher_temp, dim=-1)
    log_q = F.log_softmax(at_least_fp32(student_local) / student_temp, dim=-1)
    return -(probs * log_q).sum(dim=-1).mean()


class SCFSShallowLoss(CenteredLoss):
    """Holds one center per stage, (K, D); the center update is split into an async reduce and an apply.

    Call order per step: ``forward(...)`` -> ``reduce_center_update(teacher_global)`` (one all-reduce for all
    stages, overlapping backward) -> after the optimiser step ``apply_center_update()``.
    """

    def __init__(self, n_stages: int, dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((n_stages, dim), center_momentum)
        self.student_temp = student_temp

    def _check(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        n, d = self.center.shape
        if len(tensors) != n or any(t.dim() != 3 or t.shape[-1] != d for t in tensors):
            raise ValueError(f"SCFSShallowLoss: {name} must be {n} tensors of shape (V, B, {d}); got "
                             f"{[tuple(t.shape) for t in tensors]}")

    def forward(self, student_global: Sequence[torch.Tensor], student_local: Sequence[torch.Tensor],
                teacher_global: Sequence[torch.Tensor], searched_teacher: Sequence[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per stage k: student_global[k] / teacher_global[k] (G, B, D), student_local[k] / searched_teacher[k]
        (L, B, D). Returns (sum_k (L^g_k + L^l_k) / 2, detached (K, 2) table of [L^g_k, L^l_k])."""
        for name, ts in (("student_global", student_global), ("student_local", student_local),
                         ("teacher_global", teacher_global), ("searched_teacher", searched_teacher)):
            self._check(name, ts)
        terms = []
        with fp32_island(self.center.device.type):
            for k in range(self.center.shape[0]):
                lg = shallow_global_loss(student_global[k], teacher_global[k], self.center[k], teacher_temp,
                                         self.student_temp)
                ll = shallow_local_loss(student_local[k], searched_teacher[k], teacher_temp, self.student_temp)
                terms.append(torch.stack([lg, ll]))
        table = torch.stack(terms)  # (K, 2)
        return 0.5 * table.sum(), table.detach()

    @torch.no_grad()
    def reduce_center_update(self, teacher_global: Sequence[torch.Tensor]) -> None:
        """Start the cross-rank sum of each stage's batch sum of teacher global outputs, (G, B, D) per stage."""
        self._check("teacher_global", teacher_global)
        sums = torch.stack([batch_column_sum(t) for t in teacher_global])  # (K, D), one collective for every stage
        self.start_center_reduce(sums, teacher_global[0].shape[0] * teacher_global[0].shape[1])
