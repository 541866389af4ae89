"""CPU fused path for ReSA: Sinkhorn self-assignment in scaling form + the assignment cross-entropy, one pass per pair.

Same maths as ``losses.resa.self_assignment`` / ``losses.sinkhorn.sinkhorn_knopp`` and
``losses.resa.resa_cross_entropy`` (the definitions), reorganised:

* **Sinkhorn in scaling form.** After ``K = exp((S - colmax) / eps)`` the iterates of the reference are always
  ``diag(u) K diag(v)``; a column step is ``v = 1 / (C * (u^T K))`` and a row step ``u = 1 / (N * (K v))``. So the
  (R, C) matrix is written twice (``K`` and the returned ``A = N u K v``) instead of twice per iteration, and every
  iteration is two matrix-vector products (BLAS) reading ``K``. Distributed: ``u^T K`` is all-reduced exactly where
  the reference all-reduces its column sums, and the column maximum is taken over all ranks as there.
* **Cross-entropy with the gradient in the forward.** With ``l = n(z^q) n(z_bar^v)^T / tau``, ``r_i = sum_j A_ij``::

      row_i(q, v) = r_i lse_j(l_ij) - sum_j A_ij l_ij
      dL/dn(z^q)  = sum_v w_qv (r o softmax(l) - A) n(z_bar^v) / (tau B_l)          w_qv = [q != v] / n_pairs

  Each (q, v) pair is one compiled pass over its (B_l, B) logit block (matmul, log-sum-exp, the weighted row
  sums and the (B_l, D) gradient product); the backward is the saved (V, B_l, D) gradient pushed through the L2
  normalisation, times the upstream gradient. No (V, M, B_l, B) logit or log-softmax tensor is stored.

The per-pair and Sinkhorn elementwise functions are ``torch.compile``'d with ``dynamic=True``; ``tau`` and ``eps``
enter as 0-dim tensors. ``compile=False`` runs the same code eagerly.
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


def _pair(zq: torch.Tensor, zbv: torch.Tensor, a: torch.Tensor, r: torch.Tensor,
          tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (q, v) pair: zq (B_l, D), zbv (B, D) unit rows, a (B_l, B), r (B_l,) -> (sum_i row_i, (B_l, D) grad)."""
    logits = (zq @ zbv.T) / tau
    lse = torch.logsumexp(logits, dim=-1)
    rows = r * lse - (a * logits).sum(dim=-1)
    d = r[:, None] * torch.exp(logits - lse[:, None]) - a
    return rows.sum(), d @ zbv


@functools.cache
def _compiled(name: str):
    fn = {"kernel": _kernel, "assemble": _assemble, "pair": _pair}[name]
    return torch.compile(fn, dynamic=True)


def _fn(name: str, compile: bool):
    return _compiled(name) if compile else {"kernel": _kernel, "assemble": _assemble, "pair": _pair}[name]


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


def _normalize_backward(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of ``F.normalize(z, dim=-1)`` (eps 1e-12) at ``z`` (fp32) for cotangent ``g``."""
    norm = z.norm(dim=-1, keepdim=True)
    zn = z / norm.clamp_min(NORM_EPS)
    inside = (g - zn * (g * zn).sum(dim=-1, keepdim=True)) / norm.clamp_min(NORM_EPS)
    return torch.where(norm > NORM_EPS, inside, g / NORM_EPS)


class _ReSACE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, z_bar, assignment, temperature, compile):
        n_v, b_l, _ = z.shape
        n_m = z_bar.shape[0]
        zf = z.detach().float()
        zn = F.normalize(zf, dim=-1)
        zbn = F.normalize(z_bar.detach().float(), dim=-1)
        a = assignment.detach().float()
        r = a.sum(dim=-1)
        tau = torch.tensor(temperature, dtype=torch.float32, device=z.device)
        pair = _fn("pair", compile)
        pairs = [(q, v) for q in range(n_v) for v in range(n_m) if q != v]
        total = zf.new_zeros(())
        grad = torch.zeros_like(zn) if ctx.needs_input_grad[0] else None
        for q, v in pairs:
            rows, g = pair(zn[q], zbn[v], a, r, tau)
            total += rows
            if grad is not None:
                grad[q] += g
        scale = 1.0 / (b_l * len(pairs))
        if grad is not None:
            ctx.save_for_backward(_normalize_backward(grad * (scale / temperature), zf))
        ctx.dtype = z.dtype
        return total * scale

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
        scores = F.normalize(h.float(), dim=-1) @ F.normalize(h_bar.float(), dim=-1).T
        return sinkhorn_scaling(scores, eps, n_iters, distributed, compile)
