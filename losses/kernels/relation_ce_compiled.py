"""CPU fused path for the ReSSL relation cross-entropy: the identity of ``relation_ce_triton`` in torch.

Each student and teacher row needs ``lse(Q x / tau)`` and the softmax-weighted queue mean ``Q^T softmax(Q x / tau)``
(see ``losses.kernels.relation_ce_triton``); rows are processed in chunks so only a (chunk, K) fp32 logit block
exists at a time (the reference keeps (S, B, K) logits, log-probabilities and the (B, K) targets alive for the
backward). The backward is a single elementwise product with the saved ``u - v`` (S, B, D): no second pass over
the queue. The chunk function is ``torch.compile``'d; ``compile=False`` runs the same code eagerly.
"""

from __future__ import annotations

import functools

import torch

CHUNK_ELEMS = 1 << 22  # fp32 logits per chunk (16 MiB): peak temporary memory; fewer chunks = fewer queue passes


def _rows_chunk(x: torch.Tensor, queue: torch.Tensor, inv_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (m, D), queue (K, D), inv_t (m,) -> lse (m,), softmax-weighted queue mean (m, D), fp32."""
    z = (x.float() @ queue.float().T) * inv_t.unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    return lse, torch.exp(z - lse.unsqueeze(-1)) @ queue.float()


@functools.cache
def _compiled():
    return torch.compile(_rows_chunk, dynamic=True)


def queue_attention_chunked(x: torch.Tensor, queue: torch.Tensor, inv_t: torch.Tensor,
                            compile: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``relation_ce_triton.queue_attention``, in row chunks of ``CHUNK_ELEMS // K`` rows."""
    fn = _compiled() if compile else _rows_chunk
    step = max(1, CHUNK_ELEMS // queue.shape[0])
    parts = [fn(x[i:i + step], queue, inv_t[i:i + step]) for i in range(0, x.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class _RelationCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, queue, student_temp, teacher_temp, compile):
        s_n, b_n, d_n = student.shape
        rows = torch.cat([student.detach().reshape(s_n * b_n, d_n), teacher.detach().to(student.dtype)], dim=0)
        inv_t = torch.full((rows.shape[0],), 1.0 / student_temp, device=rows.device, dtype=torch.float32)
        inv_t[s_n * b_n:] = 1.0 / teacher_temp
        lse, mean = queue_attention_chunked(rows, queue.detach(), inv_t, compile)
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


def relation_ce_compiled(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temp: float,
                         teacher_temp: float, compile: bool = True) -> torch.Tensor:
    """Chunked fused ``ressl_cross_entropy(student, relation_targets(teacher, queue, tau_t), queue, tau_s)``.

    Args:
        student: (S, B, D) student embeddings; receives the gradient.
        teacher: (B, D) teacher keys (treated as detached).
        queue: (K, D) keys (no gradient).
        student_temp, teacher_temp: tau_s, tau_t.
        compile: run the chunk function through ``torch.compile`` (False: same code, eager).
    Returns:
        scalar fp32 loss.
    """
    return _RelationCE.apply(student, teacher, queue, student_temp, teacher_temp, compile)
