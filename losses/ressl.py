"""ReSSL loss: the student's relation to a memory queue must match the teacher's (sharper) relation.

Zheng et al., "ReSSL: Relational Self-Supervised Learning with Weak Augmentation", NeurIPS 2021.
Reference: KyleZheng1997/ReSSL @ 4d67daa (``ressl.py`` loss line, ``network/ressl.py`` queue);
method notes ``docs/methods/ressl.md`` ("Loss").

For a student embedding ``q_n`` and the teacher embedding ``k_n`` of the weak view of the same image (both unit)::

    p_n = softmax(k_n^T Q / tau_t)                      (stop-gradient target, tau_t = 0.04)
    L   = mean_{s, n} CE(p_n, log_softmax(q_{s,n}^T Q / tau_s))        (tau_s = 0.1)

Letters: S student crops, B per-rank batch, D embedding width, K queue length, N gathered (global) batch.
The queue holds teacher keys of earlier steps only: logits are computed before the current keys are enqueued.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import at_least_fp32, fp32_island
from losses.kernels import relation_ce_fused, use_fused


def relation_targets(teacher: torch.Tensor, queue: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Teacher relation distribution over the queue, in fp32. (B, D), (K, D) -> (B, K); rows sum to 1."""
    return F.softmax(at_least_fp32(teacher) @ at_least_fp32(queue).T / teacher_temp, dim=-1)


def ressl_cross_entropy(student: torch.Tensor, targets: torch.Tensor, queue: torch.Tensor,
                        student_temp: float) -> torch.Tensor:
    """Mean over crops and samples of ``CE(targets, log_softmax(student @ queue^T / tau_s))``.

    Args:
        student: (S, B, D) unit student embeddings, crop-major (every crop uses the same targets).
        targets: (B, K) teacher relation distribution (no gradient).
        queue: (K, D) unit keys.
        student_temp: tau_s.
    Returns:
        scalar fp32 loss (the average over crops of the single-crop loss).
    """
    logits = torch.einsum("sbd,kd->sbk", at_least_fp32(student), at_least_fp32(queue)) / student_temp
    log_q = F.log_softmax(logits, dim=-1)
    return -(targets.unsqueeze(0) * log_q).sum(dim=-1).mean()


class ReSSLLoss(nn.Module):
    """Holds the queue of teacher keys (a ring buffer) and its pointer as buffers (checkpointed).

    Call order per step: ``loss = forward(student, teacher)`` -> backward -> optimiser step ->
    ``enqueue(gathered teacher keys)``. The queue is read, not cloned, by ``forward``; enqueueing before the
    backward pass would therefore raise autograd's in-place modification error instead of silently using the
    new keys.
    """

    def __init__(self, dim: int = 512, queue_size: int = 131072, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, init_seed: int = 0):
        """
        Args:
            dim: embedding width D.
            queue_size: K, number of stored keys.
            student_temp: tau_s (a literal 0.1 in the official loss line).
            teacher_temp: tau_t (the official ``--t``, 0.04).
            init_seed: seed of the Gaussian queue initialisation; a fixed seed makes every rank start from the
                same queue without communication.
        """
        super().__init__()
        if dim < 1 or queue_size < 1:
            raise ValueError(f"ReSSLLoss needs dim >= 1 and queue_size >= 1, got {dim}, {queue_size}")
        if student_temp <= 0 or teacher_temp <= 0:
            raise ValueError(f"temperatures must be > 0, got student {student_temp}, teacher {teacher_temp}")
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        gen = torch.Generator().manual_seed(init_seed)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=gen), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student (S, B, D) or (B, D) unit embeddings of the student crops; teacher (B, D) unit weak-view keys.

        Returns the scalar fp32 loss; gradient reaches ``student`` only.
        """
        if student.ndim == 2:
            student = student.unsqueeze(0)
        d = self.queue.shape[1]
        if student.ndim != 3 or student.shape[-1] != d or teacher.shape != student.shape[1:]:
            raise ValueError(f"expected student (S, B, {d}) and teacher (B, {d}), got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        with fp32_island(student.device.type):
            if use_fused() and torch.float64 not in (student.dtype, teacher.dtype, self.queue.dtype):
                return relation_ce_fused(student, teacher.detach(), self.queue, self.student_temp, self.teacher_temp)
            targets = relation_targets(teacher.detach(), self.queue, self.teacher_temp)
            return ressl_cross_entropy(student, targets, self.queue, self.student_temp)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (N, D) (the teacher keys gathered from all ranks) at the pointer; advance it by N mod K.

        No host sync: the write positions are computed on the device from the pointer buffer.
        """
        k, d = self.queue.shape
        if keys.ndim != 2 or keys.shape[1] != d or keys.shape[0] > k:
            raise ValueError(f"enqueue expects keys (N <= {k}, {d}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % k
        self.queue.index_copy_(0, idx, keys.detach().to(self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(k)
