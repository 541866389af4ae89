"""Whitening numerics shared by INTL and CW-RGP: IterNorm (Newton-Schulz) and grouped ZCA channel whitening.

Everything here is a pure tensor function: no parameters, no running statistics, no distributed calls (the caller
gathers). Every function declares its precision: inputs in bf16/fp16 are upcast and the maths runs in fp32 with
autocast disabled (fp64 inputs stay fp64, for the reference tests). The official INTL code lets its Newton iteration
run in fp16 under CUDA autocast (spec ``intl.md`` §2.5); we deliberately do not.

Terminology (both official repos): ``axis=0`` is *channel whitening*: every sample is centred over its D features
and the N x N Gram matrix of the samples (features acting as observations) is whitened. ``axis=1`` is batch
whitening: features centred over the batch, D x D covariance.

These functions are the reference path the fused kernels (``losses/kernels/whiten_compiled.py``) reproduce; keep
their signatures stable.
"""

from __future__ import annotations

import torch

from losses.common import fp32_island


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype is computed in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _eye_like(sigma: torch.Tensor) -> torch.Tensor:
    return torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)


def newton_schulz_isqrt(sigma: torch.Tensor, iters: int) -> torch.Tensor:
    """IterNorm's approximation of ``sigma^{-1/2}`` (Huang et al. 2019; INTL ``Whitening2dIterNorm``).

    ``S_N = S / tr(S)``, ``P_0 = I``, ``P_{k+1} = 1.5 P_k - 0.5 P_k^3 S_N``, result ``P_T / sqrt(tr(S))``.
    No eps and no ridge, as in the official code. Fully differentiable (iterations and traces included).

    Args:
        sigma: (..., n, n) symmetric positive semi-definite matrices.
        iters: T >= 1 Newton steps (INTL default 4; few steps = a spectral modulation, not a full whitening).
    Returns:
        (..., n, n) whitening matrices, same dtype as ``sigma``.
    """
    if iters < 1:
        raise ValueError(f"IterNorm needs iters >= 1, got {iters}")
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    sigma_n = sigma / trace
    eye = _eye_like(sigma)
    p = 1.5 * eye - 0.5 * sigma_n  # step 1 from P_0 = I (P_0^3 S_N = S_N): saves three matmuls
    for _ in range(iters - 1):
        p = 1.5 * p - 0.5 * (p @ p @ p @ sigma_n)
    return p * trace.rsqrt()


def iternorm_whiten(x: torch.Tensor, iters: int = 4, axis: int = 0) -> torch.Tensor:
    """IterNorm whitening of a batch of embeddings (INTL §2.2), in fp32 (fp64 for fp64 input).

    Args:
        x: (..., N, D) embeddings, N samples of D features (leading dims batch independent problems, e.g. views).
        iters: Newton-Schulz steps T.
        axis: 0 = channel whitening (centre each sample over its D features, whiten the N x N matrix
            ``X_c X_c^T / (D-1)``, output ``W^T X_c``); 1 = batch whitening (centre each feature over the N samples,
            whiten ``X_c^T X_c / (N-1)``, output ``X_c W``).
    Returns:
        (..., N, D) whitened embeddings in the compute dtype.
    """
    if axis not in (0, 1):
        raise ValueError(f"whitening axis must be 0 (channel) or 1 (batch), got {axis}")
    n, d = x.shape[-2], x.shape[-1]
    with fp32_island(x.device.type):
        x = x.to(compute_dtype(x))
        if axis == 0:
            xc = x - x.mean(dim=-1, keepdim=True)
            sigma = xc @ xc.mT / (d - 1)
            return newton_schulz_isqrt(sigma, iters).mT @ xc
        xc = x - x.mean(dim=-2, keepdim=True)
        sigma = xc.mT @ xc / (n - 1)
        return xc @ newton_schulz_isqrt(sigma, iters)


class _ZcaIsqrt(torch.autograd.Function):
    """``sigma^{-1/2}`` by ``eigh`` whose backward is the Daleckii-Krein formula of the matrix function.

    For ``F = U f(L) U^T`` with ``f(l) = l^{-1/2}``, ``dF = U (K o (U^T dS U)) U^T`` with the divided differences
    ``K_ij = (f(l_i) - f(l_j)) / (l_i - l_j) = -1 / (r_i r_j (r_i + r_j))``, ``r = sqrt(l)``, whose diagonal is
    ``f'(l_i)``. Autograd through ``eigh`` differentiates the eigenvectors instead and divides by ``l_i - l_j``,
    which is inf/NaN as soon as two eigenvalues coincide (a rank-deficient group of embeddings, shrunk by the ridge
    to a repeated eigenvalue ``eps``); ``K`` is finite there. Where the eigenvalues are distinct both are the same
    derivative. The returned gradient is the symmetric one (``sigma`` is symmetric by construction).
    """

    @staticmethod
    def forward(ctx, sigma: torch.Tensor) -> torch.Tensor:
        eig, u = torch.linalg.eigh(sigma)
        ctx.save_for_backward(eig, u)
        return (u * eig.rsqrt().unsqueeze(-2)) @ u.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        eig, u = ctx.saved_tensors
        return zca_isqrt_adjoint(u, eig.sqrt(), grad)


def zca_isqrt_adjoint(u: torch.Tensor, r: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dSigma (..., n, n) for ``W = Sigma^{-1/2} = U diag(1/r) U^T`` given dL/dW ``grad`` (..., n, n).

    ``-U [(U^T sym(grad) U) / (r_i r_j (r_i + r_j))] U^T``: the divided differences of :class:`_ZcaIsqrt`, with no
    ``1 / (l_i - l_j)`` term (also the fused kernel's adjoint, ``losses/kernels/whiten_compiled.py``).
    """
    sym = 0.5 * (grad + grad.mT)
    kern = r.unsqueeze(-1) * r.unsqueeze(-2) * (r.unsqueeze(-1) + r.unsqueeze(-2))
    return -(u @ ((u.mT @ sym @ u) / kern) @ u.mT)


def zca_isqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Exact ZCA whitening matrix ``U diag(lambda^{-1/2}) U^T`` of symmetric positive-definite ``sigma``.

    The official CW-RGP code uses ``torch.svd``; for a symmetric PSD matrix the SVD is the eigendecomposition, and
    because ``sigma`` is built as ``X X^T`` only the symmetric part of its gradient reaches ``X``, so ``eigh`` gives
    the same values and gradients. The backward is the closed form of the matrix function's derivative
    (:class:`_ZcaIsqrt`), finite for repeated eigenvalues where differentiating ``eigh``/``svd`` gives NaN. No eps:
    a singular ``sigma`` gives inf, as upstream; callers must guarantee more channels per group than samples.

    Args:
        sigma: (..., n, n) symmetric positive-definite.
    Returns:
        (..., n, n) symmetric ``sigma^{-1/2}``.
    """
    return _ZcaIsqrt.apply(sigma)


def group_channel_whiten(x: torch.Tensor, channel_perm: torch.Tensor, groups: int, eps: float = 0.0,
                         minus: int = 1) -> torch.Tensor:
    """CW-RGP channel whitening with a random group partition (spec ``cw_rgp.md`` §3.2), in fp32.

    Per problem: centre every sample over **all** D channels, permute the channels by ``channel_perm``, split them
    into ``groups`` contiguous blocks of ``d = D / groups``, ZCA-whiten each block's n x n Gram matrix
    ``X_g X_g^T / (d - minus)`` (shrunk towards I by ``eps``), output ``W_g^T X_g``, then undo the permutation so
    every channel returns to its own column.

    Args:
        x: (..., n, D) sub-batches of embeddings; n must not exceed d.
        channel_perm: (..., D) int64 permutations of ``range(D)``, one per problem (broadcast over no dims).
        groups: G, must divide D.
        eps: ridge ``Sigma <- (1 - eps) Sigma + eps I`` (official default 0).
        minus: Gram denominator ``d - minus`` (official default 1).
    Returns:
        (..., n, D) whitened sub-batches in the compute dtype.
    """
    n, dim = x.shape[-2], x.shape[-1]
    if dim % groups:
        raise ValueError(f"channel count {dim} is not divisible by groups={groups}")
    d = dim // groups
    if n > d:
        raise ValueError(f"{n} samples per sub-batch but only {d} channels per group: the Gram matrix is singular")
    if channel_perm.shape != x.shape[:-2] + (dim,):
        want = tuple(x.shape[:-2]) + (dim,)
        raise ValueError(f"channel_perm must have shape {want}, got {tuple(channel_perm.shape)}")
    with fp32_island(x.device.type):
        x = x.to(compute_dtype(x))
        xc = x - x.mean(dim=-1, keepdim=True)
        idx = channel_perm.unsqueeze(-2).expand_as(xc)
        xg = xc.gather(-1, idx).unflatten(-1, (groups, d)).movedim(-2, -3)  # (..., G, n, d)
        sigma = xg @ xg.mT / (d - minus)
        if eps:
            sigma = (1 - eps) * sigma + eps * _eye_like(sigma)
        yg = zca_isqrt(sigma).mT @ xg  # (..., G, n, d)
        y = yg.movedim(-3, -2).flatten(-2)  # (..., n, D) in permuted channel order
        inverse = channel_perm.argsort(dim=-1).unsqueeze(-2).expand_as(y)
        return y.gather(-1, inverse)
