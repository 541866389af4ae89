"""CPU fused path for the DINO/SCFS multi-crop soft cross-entropy: the identity of ``soft_ce_triton`` in torch.

Same maths as ``losses.kernels.soft_ce_triton`` (see its docstring): per student row one log-sum-exp and one dot
product with the teacher sum ``Qsum_s = sum_{t != s} P_t``, never a (T, S, B, K) pair tensor; the backward
recomputes softmax and ``Qsum`` from the saved (S, B) and (T, B) log-sum-exps. For a global crop the backward sums
the other teachers' probabilities directly, as the Triton backward does, instead of forming ``Psum - P_s``: in fp32
that difference loses the small target where the crop's own teacher puts almost all its mass on the same class.
The batch is processed in chunks so the fp32 temporaries are (S + T, chunk, K) instead of the reference's several
(S, B, K) / (T, B, K) tensors, and each chunk function is ``torch.compile``'d (inductor fuses the elementwise work
into the reductions). With ``compile=False`` the same chunked code runs eagerly (debugging, and the compiler-off
check in the tests).

Temperatures enter the compiled functions as 0-dim tensors so a teacher-temperature schedule does not recompile.
"""

from __future__ import annotations

import functools

import torch

CHUNK_ELEMS = 1 << 18  # fp32 elements of student logits per chunk (1 MiB): sets the peak temporary memory


def _fwd_chunk(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, inv_ts: torch.Tensor, inv_tt: torch.Tensor):
    """x (S, b, K), t (T, b, K), c (K,) -> row losses (S, b), lse_s (S, b), lse_t (T, b), column sum of t (K,)."""
    n_t = t.shape[0]
    tf = t.float()
    u = (tf - c) * inv_tt
    lse_t = torch.logsumexp(u, dim=-1)
    p = torch.exp(u - lse_t.unsqueeze(-1))
    xs = x.float() * inv_ts
    lse_s = torch.logsumexp(xs, dim=-1)
    dot_sum = (xs * p.sum(0)).sum(-1)  # <Psum, x_s / tau_s>, (S, b)
    dot_self = (xs[:n_t] * p).sum(-1)  # <P_s, x_s / tau_s> for the global crops, (T, b)
    w = torch.full_like(lse_s[:, :1], float(n_t))
    w[:n_t] -= 1.0
    rows = w * lse_s - dot_sum
    rows = torch.cat([rows[:n_t] + dot_self, rows[n_t:]], dim=0)
    return rows, lse_s, lse_t, tf.sum(dim=(0, 1))


def _bwd_chunk(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, lse_s: torch.Tensor, lse_t: torch.Tensor,
               g: torch.Tensor, inv_ts: torch.Tensor, inv_tt: torch.Tensor) -> torch.Tensor:
    """Gradient for one chunk, (S, b, K) in x's dtype; g is dL/dloss * inv_ts / (B * n_pairs) (0-dim)."""
    n_t = t.shape[0]
    p = torch.exp((t.float() - c) * inv_tt - lse_t.unsqueeze(-1))
    soft = torch.exp(x.float() * inv_ts - lse_s.unsqueeze(-1))
    others = torch.stack([p[:s].sum(0) + p[s + 1:].sum(0) for s in range(n_t)])  # sum_{t != s} P_t, no cancellation
    d_glob = (n_t - 1.0) * soft[:n_t] - others
    d_loc = float(n_t) * soft[n_t:] - p.sum(0)
    return (torch.cat([d_glob, d_loc], dim=0) * g).to(x.dtype)


@functools.cache
def _compiled(name: str):
    fn = {"fwd": _fwd_chunk, "bwd": _bwd_chunk}[name]
    return torch.compile(fn, dynamic=True)


def _chunks(b_n: int, s_n: int, k_n: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // max(1, s_n * k_n))
    return [(i, min(b_n, i + step)) for i in range(0, b_n, step)]


class _SoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, compile):
        s_n, b_n, k_n = student.shape
        teacher = teacher.detach()
        c = center.detach().float()
        inv_ts = torch.tensor(1.0 / student_temp, dtype=torch.float32, device=student.device)
        inv_tt = torch.tensor(1.0 / teacher_temp, dtype=torch.float32, device=student.device)
        fwd = _compiled("fwd") if compile else _fwd_chunk
        total = student.new_zeros((), dtype=torch.float32)
        csum = torch.zeros(k_n, dtype=torch.float32, device=student.device)
        lse_s, lse_t = [], []
        for b0, b1 in _chunks(b_n, s_n, k_n):
            rows, ls, lt, cs = fwd(student[:, b0:b1], teacher[:, b0:b1], c, inv_ts, inv_tt)
            total += rows.sum()
            csum += cs
            lse_s.append(ls)
            lse_t.append(lt)
        ctx.save_for_backward(student, teacher, c, torch.cat(lse_s, 1), torch.cat(lse_t, 1), inv_ts, inv_tt)
        ctx.n_pairs = teacher.shape[0] * s_n - teacher.shape[0]
        ctx.compile = compile
        ctx.mark_non_differentiable(csum)
        return total / (b_n * ctx.n_pairs), csum

    @staticmethod
    def backward(ctx, grad_loss, _grad_csum):
        student, teacher, c, lse_s, lse_t, inv_ts, inv_tt = ctx.saved_tensors
        s_n, b_n, k_n = student.shape
        g = grad_loss.float() * inv_ts / (b_n * ctx.n_pairs)
        bwd = _compiled("bwd") if ctx.compile else _bwd_chunk
        ds = torch.empty_like(student)
        for b0, b1 in _chunks(b_n, s_n, k_n):
            ds[:, b0:b1] = bwd(student[:, b0:b1], teacher[:, b0:b1], c, lse_s[:, b0:b1], lse_t[:, b0:b1], g,
                               inv_ts, inv_tt)
        return ds, None, None, None, None, None


def soft_ce_compiled(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                     student_temp: float, teacher_temp: float, compile: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked fused ``multicrop_cross_entropy(student, teacher_probs(teacher, center, tau_t), tau_s)``.

    Args:
        student_logits: (S, B, K), globals first; receives the gradient.
        teacher_logits: (T, B, K), T <= S (treated as detached).
        center: (K,) center used for this step.
        student_temp, teacher_temp: tau_s, tau_t.
        compile: run the chunk functions through ``torch.compile`` (False: same code, eager).
    Returns:
        (scalar fp32 loss, (K,) fp32 sum over the T*B teacher rows of the raw teacher logits).
    """
    return _SoftCE.apply(student_logits, teacher_logits, center, student_temp, teacher_temp, compile)
