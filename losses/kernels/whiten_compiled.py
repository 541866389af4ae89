"""Fused whitening for INTL (IterNorm) and CW-RGP (grouped ZCA): hand-written backward, compiled pieces.

Same maths as ``losses.whitening.iternorm_whiten`` and ``losses.whitening.group_channel_whiten`` (the definitions).
X (..., n, m) has rows whitened against each other (IterNorm axis 0: n = N samples, m = D features; axis 1 is the
same on X^T), Xc is its row-centred copy, c the Gram scale, W symmetric::

    Sigma = c Xc Xc^T (+ ridge),  W = f(Sigma),  Y = W Xc
    dXc   = W dY + c (G + G^T) Xc,  G = dL/dSigma = f'(Sigma)^*[sym(Xc dY^T)],  dX = dXc - mean_row(dXc)

The backward has three (n, n) x (n, m) products (``W dY``, ``Xc dY^T``, ``(G + G^T) Xc``), autograd five.

* IterNorm: ``f`` = Newton-Schulz (``losses.whitening.newton_schulz_isqrt``); its (n, n) vector-Jacobian product is
  taken by autograd on the small matrix (recomputing the T steps, O(T n^3)).
* ZCA: ``f(Sigma) = U diag(s^-1) U^T``, ``s = sqrt(lambda)`` from ``eigh``; the closed-form adjoint
  ``G = -U [(U^T sym(dW) U) / (s_i s_j (s_i + s_j))] U^T`` has no ``1 / (l_i - l_j)`` terms, so it stays accurate
  for close eigenvalues.
Dense pieces are ``torch.compile``'d (``dynamic=True``; ``eigh`` as an ATen fallback); ``compile=False`` runs them
eagerly. Non-float64 inputs compute in fp32; the gradient has the input's dtype, the output is fp32.
"""

from __future__ import annotations

import functools

import torch

from losses.whitening import newton_schulz_isqrt, zca_isqrt_adjoint


def _centre_gram(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, m) -> row-centred xc, Sigma = scale * xc xc^T (..., n, n)."""
    xc = x - x.mean(dim=-1, keepdim=True)
    return xc, (xc @ xc.mT) * scale


def _input_grad(w: torch.Tensor, g_sigma: torch.Tensor, xc: torch.Tensor, gy: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """dX (..., n, m) from dSigma, the symmetric W and the output gradient (centring backward included)."""
    g_xc = w @ gy + ((g_sigma + g_sigma.mT) * scale) @ xc
    return g_xc - g_xc.mean(dim=-1, keepdim=True)


def _zca_forward(sigma: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigma (..., n, n), xg (..., n, m) -> (W xg, eigenvectors U, sqrt eigenvalues s)."""
    eig, u = torch.linalg.eigh(sigma)
    w = (u * eig.rsqrt().unsqueeze(-2)) @ u.mT
    return w.mT @ xg, u, eig.sqrt()


def _zca_adjoint(u: torch.Tensor, s: torch.Tensor, xg: torch.Tensor, gy: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, dL/dSigma) for W = Sigma^-1/2 given dL/dW = xg gy^T (closed-form adjoint, see module docstring)."""
    g_sigma = zca_isqrt_adjoint(u, s, xg @ gy.mT)
    w = (u / s.unsqueeze(-2)) @ u.mT
    return w, g_sigma


_FNS = {"centre_gram": _centre_gram, "input_grad": _input_grad, "zca_forward": _zca_forward,
        "zca_adjoint": _zca_adjoint}


@functools.cache
def _compiled(name: str):
    return torch.compile(_FNS[name], dynamic=True)


def _fn(name: str, compile: bool):
    return _compiled(name) if compile else _FNS[name]


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class _IterNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, iters, compile):
        xf = _compute(x)
        scale = torch.tensor(1.0 / (xf.shape[-1] - 1), dtype=xf.dtype, device=xf.device)
        xc, sigma = _fn("centre_gram", compile)(xf, scale)
        w = newton_schulz_isqrt(sigma, iters)  # symmetric: a polynomial in Sigma
        ctx.save_for_backward(xc, sigma, w, scale)
        ctx.iters, ctx.compile, ctx.dtype = iters, compile, x.dtype
        return w.mT @ xc

    @staticmethod
    def backward(ctx, gy):
        xc, sigma, w, scale = ctx.saved_tensors
        gy = gy.to(xc.dtype)
        with torch.enable_grad():
            sig = sigma.detach().requires_grad_()
            (g_sigma,) = torch.autograd.grad(newton_schulz_isqrt(sig, ctx.iters), sig, xc @ gy.mT)
        return _fn("input_grad", ctx.compile)(w, g_sigma, xc, gy, scale).to(ctx.dtype), None, None


def iternorm_whiten_compiled(x: torch.Tensor, iters: int = 4, axis: int = 0, compile: bool = True) -> torch.Tensor:
    """Fused ``losses.whitening.iternorm_whiten``: x (..., N, D) -> (..., N, D) whitened, fp32 (fp64 for fp64)."""
    if axis not in (0, 1):
        raise ValueError(f"whitening axis must be 0 (channel) or 1 (batch), got {axis}")
    if iters < 1:
        raise ValueError(f"IterNorm needs iters >= 1, got {iters}")
    if axis == 0:
        return _IterNorm.apply(x, iters, compile)
    return _IterNorm.apply(x.mT, iters, compile).mT  # batch whitening = channel whitening of X^T


class _GroupZCA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, channel_perm, groups, eps, minus, compile):
        xf = _compute(x)
        n, dim = xf.shape[-2:]
        d = dim // groups
        xc = xf - xf.mean(dim=-1, keepdim=True)
        idx = channel_perm.unsqueeze(-2).expand_as(xc)
        xg = xc.gather(-1, idx).unflatten(-1, (groups, d)).movedim(-2, -3)  # (..., G, n, d)
        scale = torch.tensor((1.0 - eps) / (d - minus), dtype=xf.dtype, device=xf.device)
        sigma = (xg @ xg.mT) * scale
        if eps:
            sigma = sigma + eps * torch.eye(n, dtype=sigma.dtype, device=sigma.device)
        yg, u, s = _fn("zca_forward", compile)(sigma, xg)
        inverse = channel_perm.argsort(dim=-1).unsqueeze(-2).expand_as(xc)
        ctx.save_for_backward(xg, u, s, idx, inverse, scale)
        ctx.compile, ctx.dtype, ctx.groups = compile, x.dtype, groups
        return yg.movedim(-3, -2).flatten(-2).gather(-1, inverse)

    @staticmethod
    def backward(ctx, gy):
        xg, u, s, idx, inverse, scale = ctx.saved_tensors
        d = xg.shape[-1]
        gyg = gy.to(xg.dtype).gather(-1, idx).unflatten(-1, (ctx.groups, d)).movedim(-2, -3)
        w, g_sigma = _fn("zca_adjoint", ctx.compile)(u, s, xg, gyg)
        g_xg = w @ gyg + ((g_sigma + g_sigma.mT) * scale) @ xg
        g_xc = g_xg.movedim(-3, -2).flatten(-2).gather(-1, inverse)
        g_x = g_xc - g_xc.mean(dim=-1, keepdim=True)
        return g_x.to(ctx.dtype), None, None, None, None, None


def group_channel_whiten_compiled(x: torch.Tensor, channel_perm: torch.Tensor, groups: int, eps: float = 0.0,
                                  minus: int = 1, compile: bool = True) -> torch.Tensor:
    """Fused ``losses.whitening.group_channel_whiten`` (same arguments, checks and result)."""
    n, dim = x.shape[-2], x.shape[-1]
    if dim % groups:
        raise ValueError(f"channel count {dim} is not divisible by groups={groups}")
    if n > dim // groups:
        raise ValueError(f"{n} samples per sub-batch but only {dim // groups} channels per group: the Gram matrix "
                         "is singular")
    if channel_perm.shape != x.shape[:-2] + (dim,):
        raise ValueError(f"channel_perm must have shape {tuple(x.shape[:-2]) + (dim,)}, got "
                         f"{tuple(channel_perm.shape)}")
    return _GroupZCA.apply(x, channel_perm, groups, float(eps), minus, compile)
