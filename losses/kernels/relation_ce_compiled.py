"""CPU fused path for the ReSSL relation cross-entropy: the queue attention of ``losses.kernels.relation_ce`` in torch.

Each student and teacher row needs ``lse(Q x / tau)`` and the softmax-weighted queue mean ``Q^T softmax(Q x / tau)``;
rows are processed in chunks so only a (chunk, K) fp32 logit block exists at a time (the reference keeps (S, B, K)
logits, log-probabilities and the (B, K) targets alive for the backward). The chunk function is
``torch.compile``'d; ``compile=False`` runs the same code eagerly.
"""

from __future__ import annotations

import functools

import torch

from losses.kernels.relation_ce import relation_ce

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
    """A ``relation_ce.QueueAttention``: (M, D), (K, D), (M,) -> (M,), (M, D) fp32, in row chunks of
    ``CHUNK_ELEMS // K`` rows."""
    fn = _compiled() if compile else _rows_chunk
    step = max(1, CHUNK_ELEMS // queue.shape[0])
    parts = [fn(x[i:i + step], queue, inv_t[i:i + step]) for i in range(0, x.shape[0], step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def relation_ce_compiled(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temp: float,
                         teacher_temp: float, compile: bool = True) -> torch.Tensor:
    """``relation_ce.relation_ce`` with the chunked queue attention.

    Args:
        student: (S, B, D) student embeddings; receives the gradient.
        teacher: (B, D) teacher keys (treated as detached).
        queue: (K, D) keys (no gradient).
        student_temp, teacher_temp: tau_s, tau_t.
        compile: run the chunk function through ``torch.compile`` (False: same code, eager).
    Returns:
        scalar fp32 loss.
    """
    attention = functools.partial(queue_attention_chunked, compile=compile)
    return relation_ce(student, teacher, queue, student_temp, teacher_temp, attention)
