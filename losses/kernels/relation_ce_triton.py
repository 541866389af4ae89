"""Triton queue attention for the ReSSL relation cross-entropy (``losses.kernels.relation_ce``).

Per row, one pass over the queue Q (K, D) gives ``lse(Q x / tau)`` and the softmax-weighted queue mean
``Q^T softmax(Q x / tau)``: single-query attention with keys = values = Q, computed with an online softmax over K
tiles (flash-attention style, BLOCK_M query rows per program so each queue tile is reused by BLOCK_M rows). The
(rows, K) logits are never stored.

All maths in fp32 (``tl.dot`` with ``input_precision="ieee"``), inputs may be bf16/fp16/fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from losses.kernels.relation_ce import relation_ce

BLOCK_M, BLOCK_N = 16, 64


@triton.jit
def _queue_attention(x_ptr, q_ptr, inv_t_ptr, lse_ptr, out_ptr, M, K, D,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows x (M, D) with per-row 1/temp: lse (M,) of x Q^T * inv_t and out (M, D) = softmax(x Q^T * inv_t) Q."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    inv_t = tl.load(inv_t_ptr + rows, mask=rmask, other=1.0)
    m = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        kmask = keys < K
        qt = tl.load(q_ptr + keys[:, None].to(tl.int64) * D + cols[None, :], mask=kmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        z = tl.dot(x, tl.trans(qt), input_precision="ieee") * inv_t[:, None]
        z = tl.where(kmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        den = den * alpha + tl.sum(e, axis=1)
        acc = acc * alpha[:, None] + tl.dot(e, qt, input_precision="ieee")
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(den), mask=rmask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], acc / den[:, None],
             mask=rmask[:, None] & cmask[None, :])


def queue_attention(x: torch.Tensor, queue: torch.Tensor, inv_temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``relation_ce.QueueAttention``: (M, D) rows, (K, D) queue, (M,) fp32 1/temp -> lse (M,) fp32 and
    softmax-weighted queue mean (M, D) fp32."""
    m_n, d_n = x.shape
    x, queue = x.contiguous(), queue.contiguous()
    lse = torch.empty(m_n, device=x.device, dtype=torch.float32)
    out = torch.empty(m_n, d_n, device=x.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d_n))
    _queue_attention[(triton.cdiv(m_n, BLOCK_M),)](x, queue, inv_temp.contiguous(), lse, out, m_n, queue.shape[0],
                                                   d_n, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return lse, out


def relation_ce_triton(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor,
                       student_temp: float, teacher_temp: float) -> torch.Tensor:
    """``relation_ce.relation_ce`` with the Triton queue attention.

    Args:
        student: (S, B, D) unit student embeddings; receives the gradient.
        teacher: (B, D) unit teacher keys (treated as detached).
        queue: (K, D) keys (no gradient).
        student_temp, teacher_temp: tau_s, tau_t.
    Returns:
        scalar fp32 loss.
    """
    return relation_ce(student, teacher, queue, student_temp, teacher_temp, queue_attention)
