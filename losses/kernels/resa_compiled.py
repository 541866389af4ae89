"""CPU fused path for ReSA: Sinkhorn self-assignment in scaling form + the assignment cross-entropy, one pass per pair.

Same maths as ``losses.resa.self_assignment`` / ``losses.sinkhorn.sinkhorn_knopp`` and
``losses.resa.resa_cross_entropy`` (the definitions), reorganised:

* **Sinkhorn in scaling form.** After ``K = exp((S - colmax) / eps)`` the iterates are ``diag(u) K diag(v)``; a column
  step is ``v = 1 / (C * (u^T K))``, a row step ``u = 1 / (N * (K v))``: the (R, C) matrix is written twice (``K`` and
  ``A = N u K v``) and each iteration is two matrix-vector products. Distributed: ``u^T K`` and the column maximum
  are all-reduced where the reference all-reduces.
* **Cross-entropy with the gradient in the forward.** With ``l = n(z^q) n(z_bar^v)^T / tau``, ``r_i = sum_j A_ij``::

      row_i(q, v) = r_i lse_j(l_ij) - sum_j A_ij l_ij
      dL/dn(z^q)  = sum_v w_qv (r o softmax(l) - A) n(z_bar^v) / (tau B_l)          w_qv = [q != v] / n_pairs

  All pairs run in one compiled graph, one pass over each (B_l, B) logit block; the backward is the saved
  (V, B_l, D) gradient times the upstream gradient, so no (V, M, B_l, B) logit tensor is stored.
Compiled with ``dynamic=True`` (specialised on V and M; ``tau``, ``eps`` as 0-dim tensors); ``compile=False``: eager.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from runtime import dist

NORM_EPS = 1e-12  # F.normalize's default eps, as in the reference


def _kernel(scores: torch.Tensor, col_max: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """K = exp((S - colmax) / eps), (R, C)."""
    return torch.exp((scores - col_max) / eps)


def _assemble(k: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
    """A = N diag(u) K diag(v), (R, C)."""
    return k * (u * n_rows)[:, None] * v[None, :]


def _assign_local(h: torch.Tensor, h_bar: torch.Tensor, eps: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Single-process self-assignment in one graph: h (B, E), h_bar (B, E) -> A (B, B)."""
    scores = F.normalize(h.float(), dim=-1) @ F.normalize(h_bar.float(), dim=-1).T
    k = _kernel(scores, scores.amax(dim=0, keepdim=True), eps)
    n_rows, n_cols = k.shape
    u = torch.ones_like(k[:, 0])
    for _ in range(n_iters):
        v = 1.0 / ((u @ k) * n_cols)
        u = 1.0 / ((k @ v) * n_rows)
    return k * (u * n_rows)[:, None] * v[None, :]


def _ce(z: torch.Tensor, z_bar: torch.Tensor, a: torch.Tensor, tau: torch.Tensor,
        need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All pairs q != v in one graph: z (V, B_l, D), z_bar (M, B, D), a (B_l, B) -> (loss, dL/dz (V, B_l, D))."""
    n_v, b_l, _ = z.shape
    n_m = z_bar.shape[0]
    zf = z.float()
    zn = F.normalize(zf, dim=-1)
    zbn = F.normalize(z_bar.float(), dim=-1)
    r = a.sum(dim=-1)
    total = zf.new_zeros(())
    grads = []
    for q in range(n_v):
        g_q = torch.zeros_like(zn[q])
        for v in range(n_m):
            if q == v:
                continue
            logits = (zn[q] @ zbn[v].T) / tau
            lse = torch.logsumexp(logits, dim=-1)
            total = total + (r * lse - (a * logits).sum(dim=-1)).sum()
            if need_grad:
                g_q = g_q + (r[:, None] * torch.exp(logits - lse[:, None]) - a) @ zbn[v]
        grads.append(g_q)
    scale = 1.0 / (b_l * (n_v * n_m - min(n_v, n_m)))
    if not need_grad:
        return total * scale, None
    return total * scale, _normalize_backward(torch.stack(grads) * (scale / tau), zf)


def _normalize_backward(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of ``F.normalize(z, dim=-1)`` (eps 1e-12) at ``z`` (fp32) for cotangent ``g``."""
    norm = z.norm(dim=-1, keepdim=True)
    zn = z / norm.clamp_min(NORM_EPS)
    inside = (g - zn * (g * zn).sum(dim=-1, keepdim=True)) / norm.clamp_min(NORM_EPS)
    return torch.where(norm > NORM_EPS, inside, g / NORM_EPS)


_FNS = {"kernel": _kernel, "assemble": _assemble, "ce": _ce, "assign_local": _assign_local}


@functools.cache
def _compiled(name: str):
    return torch.compile(_FNS[name], dynamic=True)


def _fn(name: str, compile: bool):
    return _compiled(name) if compile else _FNS[name]


@torch.no_grad()
def sinkhorn_scaling(scores: torch.Tensor, eps: float, n_iters: int, distributed: bool = False,
                     compile: bool = True) -> torch.Tensor:
    """Same contract as ``losses.sinkhorn.sinkhorn_knopp`` for fp32 scores (R, C) -> fp32 (R, C), rows sum to 1."""
    if scores.ndim != 2 or eps <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn needs a (rows, cols) matrix, eps > 0, n_iters >= 1; got shape "
                         f"{tuple(scores.shape)}, eps={eps}, n_iters={n_iters}")
    scores = scores.float()
    n_rows = scores.shape[0] * (dist.world_size() if distributed else 1)
    n_cols = scores.shape[1]
    col_max = scores.amax(dim=0, keepdim=True)
    if distributed:
        col_max = dist.gather_no_grad(col_max).amax(dim=0, keepdim=True)
    k = _fn("kernel", compile)(scores, col_max, torch.tensor(eps, dtype=torch.float32, device=scores.device))
    u = torch.ones(k.shape[0], dtype=k.dtype, device=k.device)
    for _ in range(n_iters):
        col = u @ k  # (C,) column masses of diag(u) K, before the column scaling
        if distributed:
            dist.all_reduce_sum(col)
        v = 1.0 / (col * n_cols)
        u = 1.0 / ((k @ v) * n_rows)  # rows are local: no communication
    return _fn("assemble", compile)(k, u, v, torch.tensor(float(n_rows), device=k.device))


class _ReSACE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, z_bar, assignment, temperature, compile):
        tau = torch.tensor(temperature, dtype=torch.float32, device=z.device)
        need_grad = bool(ctx.needs_input_grad[0])
        loss, grad = _fn("ce", compile)(z.detach().float(), z_bar.detach().float(), assignment.detach().float(), tau,
                                        need_grad)  # fp32 in: one graph for every input dtype
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.dtype = z.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.float()).to(ctx.dtype), None, None, None, None


def resa_cross_entropy_compiled(z: torch.Tensor, z_bar: torch.Tensor, assignment: torch.Tensor,
                                temperature: float, compile: bool = True) -> torch.Tensor:
    """Fused ``losses.resa.resa_cross_entropy``: z (V, B_l, D) (gets the gradient), z_bar (M, B, D), A (B_l, B)
    -> scalar fp32 loss (mean over the pairs q != v of the mean over rows of the soft cross-entropy)."""
    if z.shape[0] * z_bar.shape[0] - min(z.shape[0], z_bar.shape[0]) < 1:
        raise ValueError(f"ReSA needs at least one view pair q != v, got V={z.shape[0]}, M={z_bar.shape[0]}")
    return _ReSACE.apply(z, z_bar, assignment, temperature, compile)


def self_assignment_compiled(h: torch.Tensor, h_bar: torch.Tensor, eps: float, n_iters: int,
                             distributed: bool = False, compile: bool = True) -> torch.Tensor:
    """Fused ``losses.resa.self_assignment``: h (B_l, E), h_bar (B, E) -> (B_l, B) fp32 assignment."""
    with torch.no_grad():
        if not distributed:  # everything in one graph; with ranks the column sums are all-reduced between steps
            if eps <= 0 or n_iters < 1:
                raise ValueError(f"sinkhorn needs eps > 0, n_iters >= 1; got eps={eps}, n_iters={n_iters}")
            eps_t = torch.tensor(eps, dtype=torch.float32, device=h.device)
            return _fn("assign_local", compile)(h.detach().float(), h_bar.detach().float(), eps_t, int(n_iters))
        scores = F.normalize(h.float(), dim=-1) @ F.normalize(h_bar.float(), dim=-1).T
        return sinkhorn_scaling(scores, eps, n_iters, distributed, compile)
