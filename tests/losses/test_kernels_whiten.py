"""Fused INTL IterNorm and CW-RGP grouped ZCA whitening (hand-written backward, compiled CPU path) vs the reference.

The reference is ``losses.whitening`` evaluated in float64 (itself checked in ``test_intl.py`` / ``test_cw_rgp.py``).
Tolerances (relative to the largest reference entry): IterNorm fp32 output 1e-5, gradient 1e-5; ZCA fp32 output
1e-4, gradient 1e-4 (an exact inverse square root of a Gram matrix with n close to d: the condition number
amplifies fp32 rounding; the fp32 reference itself lands at ~1e-5); bf16 inputs (the reference sees the same
bf16-rounded values): outputs as fp32, gradients 1e-2 (bf16 gradient store). A fixed random upstream gradient
is used. Compiled cases share one set of compiled functions (``dynamic=True``).
"""

from __future__ import annotations

import pytest
import torch

from losses import kernels
from losses.cw_rgp import CWRGPLoss, partition_generator
from losses.intl import INTLLoss
from losses.kernels import whiten_compiled as fused
from losses.whitening import group_channel_whiten, iternorm_whiten

# IterNorm (leading dims, N, D); ZCA (leading dims, n, D, G).
ITER_SHAPES = [((2,), 7, 19), ((), 16, 9), ((3,), 5, 5)]
ZCA_SHAPES = [((3,), 5, 24, 3), ((2, 2), 4, 18, 2), ((), 5, 7, 1), ((2, 3, 2), 5, 26, 2)]
OUT_TOL = {"iter": 1e-5, "zca": 1e-4}
GRAD_TOL = {("iter", torch.float32): 1e-5, ("zca", torch.float32): 1e-4, ("iter", torch.bfloat16): 1e-2,
            ("zca", torch.bfloat16): 1e-2}


def _compare(kind, dtype, x, ref_fn, fused_fn):
    gen = torch.Generator().manual_seed(7)
    x64 = x.double().requires_grad_()
    ref = ref_fn(x64)
    up = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref * up).sum().backward()
    xx = x.clone().requires_grad_()
    out = fused_fn(xx)
    (out * up.to(out.dtype)).sum().backward()
    assert out.dtype == torch.float32 and xx.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=OUT_TOL[kind] * ref.abs().max().item())
    tol = GRAD_TOL[kind, dtype] * x64.grad.abs().max().item()
    torch.testing.assert_close(xx.grad.double(), x64.grad, rtol=0, atol=tol)


def _check_iternorm(shape, axis, dtype, compile):
    lead, n, d = shape
    x = torch.randn(*lead, n, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    _compare("iter", dtype, x, lambda t: iternorm_whiten(t, 4, axis),
             lambda t: fused.iternorm_whiten_compiled(t, 4, axis, compile=compile))


def _check_zca(shape, eps, dtype, compile):
    lead, n, dim, groups = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, n, dim, generator=gen).to(dtype)
    perm = torch.rand(*lead, dim, generator=gen).argsort(dim=-1)
    _compare("zca", dtype, x, lambda t: group_channel_whiten(t, perm, groups, eps, 1),
             lambda t: fused.group_channel_whiten_compiled(t, perm, groups, eps, 1, compile=compile))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shape", ITER_SHAPES)
def test_iternorm_eager_matches_reference(shape, axis, dtype):
    _check_iternorm(shape, axis, dtype, compile=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("shape", ZCA_SHAPES)
def test_zca_eager_matches_reference(shape, eps, dtype):
    _check_zca(shape, eps, dtype, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ITER_SHAPES[:1])  # one graph, shared with the INTL dispatch test
def test_iternorm_compiled_matches_reference(shape, dtype):
    _check_iternorm(shape, 0, dtype, compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ZCA_SHAPES[3:])  # (I, S, V) leading dims: shares graphs with CW-RGP dispatch
def test_zca_compiled_matches_reference(shape, dtype):
    _check_zca(shape, 0.0, dtype, compile=True)


def test_zca_checks_match_reference():
    x, perm = torch.randn(5, 12), torch.arange(12)
    with pytest.raises(ValueError, match="divisible"):
        fused.group_channel_whiten_compiled(x, perm, 5)
    with pytest.raises(ValueError, match="singular"):
        fused.group_channel_whiten_compiled(x, perm, 4)
    with pytest.raises(ValueError, match="channel_perm"):
        fused.group_channel_whiten_compiled(x, perm[:6], 2)


def _run_both(fn):
    out = {}
    try:
        for flag in (False, True):
            kernels.set_fused(flag)
            out[flag] = fn()
    finally:
        kernels.set_fused(None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("axis,momentum", [(0, False), (1, True)])
def test_intl_module_dispatch_matches_reference(axis, momentum):
    gen = torch.Generator().manual_seed(4)
    z, target = torch.randn(3, 12, 10, generator=gen), torch.randn(12, 10, generator=gen)
    mod = INTLLoss(iters=4, axis=axis)

    def run():
        x = z.clone().requires_grad_()
        loss, logs = mod(x, target if momentum else None)
        loss.backward()
        return loss.detach(), logs["nmse"], x.grad
    out = _run_both(run)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][2], out[False][2], rtol=0, atol=1e-5 * out[False][2].abs().max())


@pytest.mark.slow
def test_cw_rgp_module_dispatch_matches_reference():
    z = torch.randn(2, 8, 24, generator=torch.Generator().manual_seed(5))
    mod = CWRGPLoss(groups=2, w_size=4, w_iter=2)
    sample_perm, channel_perm = mod.draw(z, partition_generator(0, 3, 0, z.device))

    def run():
        x = z.clone().requires_grad_()
        loss, _ = mod(x, sample_perm, channel_perm, cov_weight=0.01)
        loss.backward()
        return loss.detach(), x.grad
    out = _run_both(run)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-4 * out[False][1].abs().max())


def test_cw_rgp_cpu_gate(monkeypatch):
    """FLASHSSL_FUSED=1 keeps CW-RGP on the reference on CPU (measured not faster); set_fused(True) forces it."""
    kernels.set_fused(None)
    monkeypatch.setenv("FLASHSSL_FUSED", "1")
    cpu = torch.device("cpu")
    assert not kernels.fused_for("cw_rgp", cpu) and kernels.fused_for("intl", cpu)
    assert kernels.fused_for("cw_rgp", torch.device("cuda"))
    try:
        kernels.set_fused(True)
        assert kernels.fused_for("cw_rgp", cpu)
    finally:
        kernels.set_fused(None)
    monkeypatch.setenv("FLASHSSL_FUSED", "0")
    assert not kernels.fused_for("intl", cpu)
