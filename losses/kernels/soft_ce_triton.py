"""Triton kernels for the DINO/SCFS multi-crop soft cross-entropy with centering.

The loss (``losses.dino.multicrop_cross_entropy`` over ``teacher_probs``) is, per sample b and student crop s,
with ``Qsum_s = sum_{t != s} P_t`` (``= Psum - P_s`` for a global crop s < T, else ``Psum``) and
``w_s = sum_k Qsum_s[k] = T - [s < T]``::

    l[s, b] = -sum_k Qsum_s[b, k] log_softmax(x_s / tau_s)[b, k] = w_s * lse_s[b] - <Qsum_s[b], x_s[b]> / tau_s
    L       = sum_{s, b} l[s, b] / (B * (T * S - T))
    dL/dx_s = (w_s * softmax(x_s / tau_s) - Qsum_s) / (tau_s * B * (T * S - T))

so one pass over K per student row suffices, and the backward recomputes softmax and ``Qsum`` from the saved
per-row log-sum-exps instead of storing a (B, K) probability tensor. All math in fp32; K tiled by ``BLOCK``:

* ``_teacher_stats``, grid (T*B,): lse_t of (t - c)/tau_t per teacher row, plus the center update's column sum of
  raw teacher logits (atomic adds into a (K,) fp32 buffer);
* ``_soft_ce_fwd``, grid (B*S,), s fastest so a sample's S programs share its teacher tiles in L2: online
  log-sum-exp of x_s/tau_s, <Psum, x_s>, <P_s, x_s> -> l[s, b], lse_s[b];
* ``_soft_ce_bwd``, grid (B*S,): the gradient above, in the student dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 1024


@triton.jit
def _teacher_stats(t_ptr, c_ptr, lse_ptr, csum_ptr, K, inv_tt, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = t_ptr + row.to(tl.int64) * K
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    m = zero - float("inf")
    acc = zero
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(csum_ptr + offs, x, mask=mask)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        u = tl.where(mask, (x - c) * inv_tt, float("-inf"))
        m_new = tl.maximum(m, tl.max(u, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(acc))


@triton.jit
def _soft_ce_fwd(s_ptr, t_ptr, c_ptr, lse_t_ptr, loss_ptr, lse_s_ptr, B, K, inv_ts, inv_tt,
                 S: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // S
    s = pid % S
    s_base = s_ptr + (s * B + b).to(tl.int64) * K
    zero = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    m = zero - float("inf")
    acc = zero
    dot_sum = zero
    dot_self = zero
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(s_base + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        psum = tl.zeros([BLOCK], tl.float32)
        pself = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            tv = tl.load(t_ptr + (t * B + b).to(tl.int64) * K + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.where(mask, tl.exp((tv - c) * inv_tt - tl.load(lse_t_ptr + t * B + b)), 0.0)
            psum += p
            pself += p * (s == t).to(tl.float32)
        dot_sum += tl.sum(psum * x, axis=0)
        dot_self += tl.sum(pself * x, axis=0)
        xm = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(xm, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(xm - m_new), axis=0)
        m = m_new
    lse = m + tl.log(acc)
    w = T - (s < T).to(tl.float32)
    tl.store(loss_ptr + s * B + b, w * lse - (dot_sum - dot_self))
    tl.store(lse_s_ptr + s * B + b, lse)


@triton.jit
def _soft_ce_bwd(s_ptr, t_ptr, c_ptr, lse_t_ptr, lse_s_ptr, g_ptr, ds_ptr, B, K, inv_ts, inv_tt,
                 S: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // S
    s = pid % S
    row = (s * B + b).to(tl.int64) * K
    lse = tl.load(lse_s_ptr + s * B + b)
    g = tl.load(g_ptr)  # dL/dloss * inv_ts / (B * n_pairs), prepared on the device (no host sync)
    w = T - (s < T).to(tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(s_ptr + row + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
        c = tl.load(c_ptr + offs, mask=mask, other=0.0)
        q = tl.zeros([BLOCK], tl.float32)
        for t in tl.static_range(T):
            tv = tl.load(t_ptr + (t * B + b).to(tl.int64) * K + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp((tv - c) * inv_tt - tl.load(lse_t_ptr + t * B + b))
            q += p * (s != t).to(tl.float32)
        d = g * (w * tl.exp(x - lse) - q)
        tl.store(ds_ptr + row + offs, d.to(ds_ptr.dtype.element_ty), mask=mask)


class _SoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp):
        s_n, b_n, k_n = student.shape
        t_n = teacher.shape[0]
        student, teacher = student.contiguous(), teacher.detach().contiguous()
        center = center.detach().float().contiguous()
        dev = student.device
        lse_t = torch.empty(t_n * b_n, device=dev, dtype=torch.float32)
        csum = torch.zeros(k_n, device=dev, dtype=torch.float32)
        _teacher_stats[(t_n * b_n,)](teacher, center, lse_t, csum, k_n, 1.0 / teacher_temp, BLOCK=BLOCK_K)
        rows = torch.empty(s_n * b_n, device=dev, dtype=torch.float32)
        lse_s = torch.empty_like(rows)
        _soft_ce_fwd[(s_n * b_n,)](student, teacher, center, lse_t, rows, lse_s, b_n, k_n, 1.0 / student_temp,
                                   1.0 / teacher_temp, S=s_n, T=t_n, BLOCK=BLOCK_K)
        ctx.save_for_backward(student, teacher, center, lse_t, lse_s)
        ctx.temps = (student_temp, teacher_temp)
        ctx.n_pairs = t_n * s_n - t_n
        ctx.mark_non_differentiable(csum)
        return rows.sum() / (b_n * ctx.n_pairs), csum

    @staticmethod
    def backward(ctx, grad_loss, _grad_csum):
        student, teacher, center, lse_t, lse_s = ctx.saved_tensors
        s_n, b_n, k_n = student.shape
        ts, tt = ctx.temps
        g = (grad_loss.float() / (ts * b_n * ctx.n_pairs)).reshape(1).contiguous()
        ds = torch.empty_like(student)
        _soft_ce_bwd[(s_n * b_n,)](student, teacher, center, lse_t, lse_s, g, ds, b_n, k_n, 1.0 / ts, 1.0 / tt,
                                   S=s_n, T=teacher.shape[0], BLOCK=BLOCK_K)
        return ds, None, None, None, None


def soft_ce_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                   student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``multicrop_cross_entropy(student, teacher_probs(teacher, center, tau_t), tau_s)``.

    Args:
        student_logits: (S, B, K) fp32/bf16/fp16, globals first; receives the gradient.
        teacher_logits: (T, B, K), T <= S (treated as detached).
        center: (K,) center used for this step.
        student_temp, teacher_temp: tau_s, tau_t.
    Returns:
        (scalar fp32 loss, (K,) fp32 sum over the T*B teacher rows of the raw teacher logits for the center update).
    """
    return _SoftCE.apply(student_logits, teacher_logits, center, student_temp, teacher_temp)
