"""Fused MV-MR distance correlations (shared ``y`` matrix, hand-written backward, compiled CPU path) vs the reference.

The reference is ``losses.mvmr.distance_correlation`` evaluated in float64 (itself checked against a naive loop in
``test_mvmr.py``). Tolerances: dCor values atol 1e-5 (values in [0, 1]); gradients atol 2e-5 * max|grad| for fp32
inputs (the (N, N) centring and the Gram expansion cancel: fp32 lands at ~2e-6) and 1e-2 * max|grad| for bf16
inputs (the reference sees the same bf16-rounded values; bf16 gradient store). Compiled cases share one set of
compiled functions (``dynamic=True``).
"""

from __future__ import annotations

import pytest
import torch

from losses import kernels
from losses.kernels import dcor_compiled as fused
from losses.mvmr import DCorTarget, MVMRLoss, distance_correlation

# (N, y width, widths of the xs); the first x carries gradient (MV-MR's z_o), the others do not (targets).
SHAPES = [(13, 20, (7, 33)), (8, 5, (5, 64, 3)), (3, 2, (4,))]
CLAMPS = (0.3, 1e-4, 2.0)
Y_CLAMP = 0.5
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _inputs(shape, dtype, seed=0):
    n, q, widths = shape
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, q, generator=gen).to(dtype)
    xs = [(torch.randn(n, p, generator=gen) * (1 + i)).to(dtype) for i, p in enumerate(widths)]
    up = torch.randn(len(widths), generator=gen, dtype=torch.float64)  # non-unit upstream gradient per term
    return y, xs, up


def _check(shape, dtype, compile):
    y, xs, up = _inputs(shape, dtype)
    clamps = list(CLAMPS[:len(xs)])
    y64, x64 = y.double().requires_grad_(), xs[0].double().requires_grad_()
    ref = torch.stack([distance_correlation(x, y64, c, Y_CLAMP)
                       for x, c in zip([x64] + [x.double() for x in xs[1:]], clamps)])
    (ref * up).sum().backward()
    yy, x0 = y.clone().requires_grad_(), xs[0].clone().requires_grad_()
    out = fused.distance_correlations_compiled(yy, [x0] + xs[1:], Y_CLAMP, clamps, compile=compile)
    (out * up.float()).sum().backward()
    assert out.dtype == torch.float32 and yy.grad.dtype == dtype and x0.grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    for got, want in ((yy.grad, y64.grad), (x0.grad, x64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=GRAD_TOL[dtype] * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_eager_matches_reference(shape, dtype):
    _check(shape, dtype, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_matches_reference(shape, dtype):
    _check(shape, dtype, compile=True)


def test_clamp_active_on_close_rows_matches_reference():
    """Duplicate rows put off-diagonal squared distances under the clamp (no gradient there, as the reference)."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(6, 4, generator=gen)
    y[3] = y[1]
    x = torch.randn(6, 5, generator=gen)
    y64 = y.double().requires_grad_()
    ref = distance_correlation(x.double(), y64, 1e-4, 0.1)
    ref.backward()
    yy = y.clone().requires_grad_()
    out = fused.distance_correlations_compiled(yy, [x], 0.1, [1e-4], compile=False)
    out.sum().backward()
    torch.testing.assert_close(out[0].double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(yy.grad.double(), y64.grad, rtol=0, atol=2e-5 * y64.grad.abs().max().item())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one clamp per input"):
        fused.distance_correlations_compiled(torch.randn(4, 3), [torch.randn(4, 2)], 0.1, [])
    with pytest.raises(ValueError, match="N = 4"):
        fused.distance_correlations_compiled(torch.randn(4, 3), [torch.randn(5, 2)], 0.1, [0.1])


@pytest.mark.slow
def test_module_dispatch_matches_reference():
    """MVMRLoss with the switch on (compiled path) and off: same loss, logs and gradients of both embeddings."""
    gen = torch.Generator().manual_seed(2)
    z_o, z_a = torch.randn(10, 12, generator=gen), torch.randn(10, 12, generator=gen)
    targets = {"img": DCorTarget(torch.randn(10, 3, 4, 4, generator=gen), 1e-4, maximise=False),
               "teacher": DCorTarget(torch.randn(10, 7, generator=gen), 0.1, maximise=True)}
    mod = MVMRLoss(z_clamp=0.1)
    out = {}
    try:
        for flag in (False, True):
            kernels.set_fused(flag)
            a, b = z_o.clone().requires_grad_(), z_a.clone().requires_grad_()
            loss, logs = mod(a, b, targets)
            loss.backward()
            out[flag] = (loss.detach(), logs, a.grad, b.grad)
    finally:
        kernels.set_fused(None)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
    assert out[True][1].keys() == out[False][1].keys()
    for k in out[False][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[True][2:], out[False][2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max())
