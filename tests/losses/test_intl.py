"""INTL loss vs a naive float64 reference written from the equations of spec ``intl.md`` §2.2-§2.3.

The reference uses explicit per-sample loops and the Newton-Schulz recursion exactly as written (P_0 = I, T full
steps), independent of the batched implementation in ``losses/whitening.py`` / ``losses/intl.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from losses.intl import INTLLoss, intl_trade_off, norm_mse, trace_loss
from losses.whitening import iternorm_whiten, newton_schulz_isqrt


# ---------------------------------------------------------------------------------------------- naive reference
def ref_iternorm(x: torch.Tensor, iters: int, axis: int) -> torch.Tensor:
    """x (N, D) float64 -> whitened (N, D)."""
    n, d = x.shape
    if axis == 0:  # centre each sample over its features; N x N Gram with features as observations
        xc = torch.stack([x[i] - sum(x[i][j] for j in range(d)) / d for i in range(n)])
        sigma = torch.zeros(n, n, dtype=x.dtype)
        for i in range(n):
            for k in range(n):
                sigma[i, k] = (xc[i] * xc[k]).sum() / (d - 1)
    else:  # centre each feature over the batch; D x D covariance
        xc = x - x.sum(0) / n
        sigma = xc.T @ xc / (n - 1)
    tr = sum(sigma[i, i] for i in range(sigma.shape[0]))
    sigma_n = sigma / tr
    p = torch.eye(sigma.shape[0], dtype=x.dtype)
    for _ in range(iters):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    w = p / torch.sqrt(tr)
    return w.T @ xc if axis == 0 else xc @ w


def ref_trace_loss(y: torch.Tensor, axis: int) -> torch.Tensor:
    rows = y if axis == 0 else y.T
    total = y.new_zeros(())
    for r in rows:
        m = r.sum() / r.numel()
        v = ((r - m) ** 2).sum() / (r.numel() - 1)
        total = total + (v - 1) ** 2
    return total


def ref_nmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = [torch.dot(a[i], b[i]) / (torch.sqrt(torch.dot(a[i], a[i])) * torch.sqrt(torch.dot(b[i], b[i])))
           for i in range(a.shape[0])]
    return 2 - 2 * sum(cos) / len(cos)


def ref_intl(z: torch.Tensor, iters: int, axis: int, lam: float) -> torch.Tensor:
    """Symmetric intl: (1/(V-1)) sum_{i>=1} nmse(Y_i, Y_0) + lam (TL_i + TL_0)."""
    y = [ref_iternorm(v, iters, axis) for v in z]
    tl = [ref_trace_loss(v, axis) for v in y]
    total = sum(ref_nmse(y[i], y[0]) + lam * (tl[i] + tl[0]) for i in range(1, len(y)))
    return total / (len(y) - 1)


def ref_intl_m(z_online: torch.Tensor, target: torch.Tensor, iters: int, axis: int, lam: float) -> torch.Tensor:
    y_t = ref_iternorm(target, iters, axis).detach()
    terms = []
    for v in z_online:
        y = ref_iternorm(v, iters, axis)
        terms.append(ref_nmse(y, y_t) + lam * ref_trace_loss(y, axis))
    return sum(terms) / len(terms)


def _z(v: int, n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, n, d, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("axis,iters,v,n,d", [(0, 4, 2, 8, 12), (0, 6, 3, 6, 10), (1, 4, 2, 12, 5), (1, 3, 3, 9, 4)])
def test_symmetric_loss_and_grads_match_reference(axis, iters, v, n, d):
    z = _z(v, n, d)
    loss, logs = INTLLoss(iters=iters, axis=axis)(z)
    (grad,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().clone().requires_grad_(True)
    lam = 0.01 * (math.log2(n if axis == 0 else d) - 3)
    ref = ref_intl(z_ref, iters, axis, lam)
    ref.backward()
    _close(loss, ref)
    _close(grad, z_ref.grad)
    assert float(logs["trade_off"]) == pytest.approx(lam)


@pytest.mark.parametrize("axis", [0, 1])
def test_momentum_loss_and_grads_match_reference(axis):
    z = _z(3, 8, 10, seed=1)
    target = _z(1, 8, 10, seed=2)[0]
    loss, _ = INTLLoss(iters=4, axis=axis, trade_off=0.07)(z, target)
    g_online, = torch.autograd.grad(loss, z)
    z_ref = z.detach().clone().requires_grad_(True)
    ref = ref_intl_m(z_ref, target.detach(), 4, axis, 0.07)
    ref.backward()
    _close(loss, ref)
    _close(g_online, z_ref.grad)


def test_target_receives_no_gradient():
    z, target = _z(2, 8, 10), _z(1, 8, 10, seed=3)[0].detach().requires_grad_(True)
    loss, _ = INTLLoss()(z, target)
    loss.backward()
    assert target.grad is None and z.grad is not None


def test_pieces_match_reference():
    y = _z(1, 7, 9)[0].detach()
    for axis in (0, 1):
        _close(trace_loss(y, axis), ref_trace_loss(y, axis))
        _close(iternorm_whiten(y, 5, axis), ref_iternorm(y, 5, axis))
    _close(norm_mse(y, y.flip(0)), ref_nmse(y, y.flip(0)))


def test_trade_off_uses_global_batch_and_width():
    assert intl_trade_off(256, 8192, 0) == pytest.approx(0.05)  # spec §2.3: B = 256 -> 0.05
    assert intl_trade_off(256, 8192, 1) == pytest.approx(0.10)  # D = 8192 -> 0.10
    assert INTLLoss(trade_off=0.3).lam(256, 8192) == 0.3


@pytest.mark.parametrize("axis", [0, 1])
def test_many_iterations_whiten(axis):
    """IterNorm converges to Sigma^{-1/2}: the whitened output has identity Gram (axis 0) / covariance (axis 1).

    (The uncoupled Newton-Schulz form is not self-correcting: rounding in non-commuting directions grows again after
    convergence - even in fp64 it diverges beyond ~15 steps here - so this checks well-conditioned cases at T = 12.)"""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64) if axis == 0 else torch.randn(40, 6, generator=g,
                                                                                            dtype=torch.float64)
    y = iternorm_whiten(x, iters=12, axis=axis)
    cov = y @ y.T / (x.shape[1] - 1) if axis == 0 else y.T @ y / (x.shape[0] - 1)
    torch.testing.assert_close(cov, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    # and the matrix itself approximates the inverse square root
    sig = torch.randn(5, 5, generator=g, dtype=torch.float64)
    sig = sig @ sig.T + 0.5 * torch.eye(5, dtype=torch.float64)
    w = newton_schulz_isqrt(sig, 12)
    torch.testing.assert_close(w @ sig @ w, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)


def test_whitening_is_fp32_under_bf16_autocast():
    z = torch.randn(2, 16, 32)
    ref, _ = INTLLoss()(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = iternorm_whiten(z.bfloat16(), 4, 0)
        same, _ = INTLLoss()(z)
        low, _ = INTLLoss()(z.bfloat16())
    assert y.dtype == torch.float32 and same.dtype == torch.float32
    torch.testing.assert_close(same, ref, rtol=1e-6, atol=1e-6)  # fp32 input: autocast has no effect inside
    # bf16 embeddings (8-bit mantissa, relative rounding <= 2^-8) move the loss by ~1e-4 relative; allow 2e-3
    assert abs(float(low) - float(ref)) <= 2e-3 * abs(float(ref))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="V >= 2"):
        INTLLoss()(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="target"):
        INTLLoss()(torch.randn(2, 8, 4), torch.randn(7, 4))
    with pytest.raises(ValueError, match="axis"):
        INTLLoss(axis=2)
    with pytest.raises(ValueError, match="iters"):
        newton_schulz_isqrt(torch.eye(3), 0)
