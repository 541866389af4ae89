"""The ReSSL relation cross-entropy (``losses.ressl``) as one autograd Function over a queue-attention kernel.

With the queue Q (K, D), the teacher target ``p_b = softmax(Q k_b / tau_t)`` and the student log-probabilities
``log_softmax(Q x_{s,b} / tau_s)``, the identity ``<p_b, Q x> = x . (Q^T p_b)`` gives, with the teacher-weighted
queue mean ``v_b = Q^T p_b`` (D,) and the student one ``u_{s,b} = Q^T softmax(Q x_{s,b} / tau_s)`` (D,)::

    L       = mean_{s, b} [ lse(Q x_{s,b} / tau_s) - x_{s,b} . v_b / tau_s ]
    dL/dx_s = (u_{s,b} - v_b) / (tau_s * S * B)

Every row (student or teacher) therefore needs only one pass over the queue computing a log-sum-exp and a
softmax-weighted mean of the queue rows: single-query attention with keys = values = Q. That pass is the kernel
(``QueueAttention``): Triton in ``relation_ce_triton``, chunked torch in ``relation_ce_compiled``. The (B, K) logits
are never stored, and the backward needs no second pass: ``u - v`` (S, B, D) is saved by the forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# rows (M, D), queue (K, D), per-row 1/temp (M,) fp32 -> lse (M,) fp32, softmax-weighted queue mean (M, D) fp32
QueueAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _RelationCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, queue, student_temp, teacher_temp, queue_attention):
        s_n, b_n, d_n = student.shape
        rows = torch.cat([student.detach().reshape(s_n * b_n, d_n), teacher.detach().to(student.dtype)], dim=0)
        inv_t = torch.full((rows.shape[0],), 1.0 / student_temp, device=rows.device, dtype=torch.float32)
        inv_t[s_n * b_n:] = 1.0 / teacher_temp
        lse, mean = queue_attention(rows, queue.detach(), inv_t)
        u, v = mean[:s_n * b_n].view(s_n, b_n, d_n), mean[s_n * b_n:]
        loss = (lse[:s_n * b_n].sum() - (student.detach().float() * v).sum() / student_temp) / (s_n * b_n)
        ctx.save_for_backward(u - v)
        ctx.scale = 1.0 / (student_temp * s_n * b_n)
        ctx.dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (diff,) = ctx.saved_tensors
        return (diff * (grad_loss.float() * ctx.scale)).to(ctx.dtype), None, None, None, None, None


def relation_ce(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temp: float,
                teacher_temp: float, queue_attention: QueueAttention) -> torch.Tensor:
    """Fused ``ressl_cross_entropy(student, relation_targets(teacher, queue, tau_t), queue, tau_s)``.

    Args:
        student: (S, B, D) student embeddings (fp32/bf16/fp16); receives the gradient, in its dtype.
        teacher: (B, D) teacher keys (treated as detached).
        queue: (K, D) keys (no gradient).
        student_temp, teacher_temp: tau_s, tau_t.
        queue_attention: the kernel that makes the one pass over the queue per row.
    Returns:
        scalar fp32 loss.
    """
    return _RelationCE.apply(student, teacher, queue, student_temp, teacher_temp, queue_attention)
