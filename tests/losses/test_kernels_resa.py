"""Fused ReSA (scaling-form Sinkhorn + one-pass assignment cross-entropy, compiled CPU path) against the reference.

The reference is ``losses.resa`` / ``losses.sinkhorn`` evaluated in float64 (itself checked against a naive loop in
``test_resa.py``). Tolerances: assignment atol 1e-5 (entries <= 1); loss rel 1e-5; gradient atol
1e-5 * max|grad| for fp32 inputs and 1e-2 * max|grad| for bf16 inputs (the reference sees the same bf16-rounded
values in float64; only fp32 accumulation and the bf16 gradient store differ). The compiled cases share one set of
compiled functions (``dynamic=True``) across shapes and dtypes.
"""

from __future__ import annotations

import pytest
import torch

from losses import kernels
from losses.kernels import resa_compiled as fused
from losses.resa import ReSALoss, resa_cross_entropy, self_assignment
from tests.dist_helpers import run_distributed

TAU, EPS, ITERS = 0.4, 0.05, 3
# (V, M, B, D, E): V == M, multi-crop V > M, odd sizes, a single sample.
SHAPES = [(2, 2, 8, 16, 24), (4, 2, 7, 5, 13), (3, 1, 1, 3, 2)]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(shape, dtype, seed=0):
    n_v, n_m, b, d, e = shape
    gen = torch.Generator().manual_seed(seed)
    h, h_bar = (torch.randn(b, e, generator=gen).to(dtype) for _ in range(2))
    z = torch.randn(n_v, b, d, generator=gen).to(dtype)
    z_bar = torch.randn(n_m, b, d, generator=gen).to(dtype)
    return z, h, z_bar, h_bar


def _check(shape, dtype, compile):
    z, h, z_bar, h_bar = _inputs(shape, dtype)
    a64 = self_assignment(h.double(), h_bar.double(), EPS, ITERS)
    z64 = z.double().requires_grad_()
    ref = resa_cross_entropy(z64, z_bar.double(), a64, TAU)
    ref.backward()
    a = fused.self_assignment_compiled(h, h_bar, EPS, ITERS, compile=compile)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), a64, rtol=0, atol=1e-5)
    x = z.clone().requires_grad_()
    loss = fused.resa_cross_entropy_compiled(x, z_bar, a, TAU, compile=compile)
    (2.0 * loss).backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    tol = GRAD_TOL[dtype] * 2.0 * z64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), 2.0 * z64.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_eager_matches_reference(shape, dtype):
    _check(shape, dtype, compile=False)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:2])  # the graph specialises on (V, M): one compile per pair of counts
def test_compiled_matches_reference(shape, dtype):
    _check(shape, dtype, compile=True)


def test_sinkhorn_scaling_matches_reference_at_other_eps_and_iters():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(9, 14, generator=gen).tanh()
    from losses.sinkhorn import sinkhorn_knopp
    for eps, iters in ((0.1, 1), (0.03, 5)):
        ref = sinkhorn_knopp(scores.double(), eps, iters)
        out = fused.sinkhorn_scaling(scores, eps, iters, compile=False)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.sum(1), torch.ones(9), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sinkhorn_scaling_compiled_matches_reference():
    """The piecewise (distributed-capable) Sinkhorn with its compiled elementwise steps."""
    from losses.sinkhorn import sinkhorn_knopp
    scores = torch.randn(7, 12, generator=torch.Generator().manual_seed(4)).tanh()
    out = fused.sinkhorn_scaling(scores, EPS, ITERS, compile=True)
    torch.testing.assert_close(out.double(), sinkhorn_knopp(scores.double(), EPS, ITERS), rtol=0, atol=1e-5)


def test_no_gradient_work_without_grad():
    z, h, z_bar, h_bar = _inputs(SHAPES[0], torch.float32)
    a = fused.self_assignment_compiled(h, h_bar, EPS, ITERS, compile=False)
    with torch.no_grad():
        loss = fused.resa_cross_entropy_compiled(z.requires_grad_(), z_bar, a, TAU, compile=False)
    assert loss.grad_fn is None and torch.isfinite(loss)


@pytest.mark.slow
def test_module_dispatch_matches_reference():
    """ReSALoss with the switch on (compiled path) and off: same loss, assignment and gradient over two steps."""
    mod = ReSALoss(TAU, EPS, ITERS)
    try:
        for step in range(2):
            z, h, z_bar, h_bar = _inputs((2, 2, 6, 8, 10), torch.float32, seed=step)  # shares SHAPES[0]'s graph
            out = {}
            for flag in (False, True):
                kernels.set_fused(flag)
                x = z.clone().requires_grad_()
                loss, a = mod(x, h, z_bar, h_bar)
                loss.backward()
                out[flag] = (loss.detach(), a, x.grad)
            torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
            torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[True][2], out[False][2], rtol=0, atol=1e-5 * out[False][2].abs().max())
    finally:
        kernels.set_fused(None)


def _module_worker(rank, world_size, tmpdir, z, h, z_bar, h_bar):
    fused._compiled = lambda name: fused._FNS[name]  # eager in the workers: same code, no per-process compile
    kernels.set_fused(True)
    b_l = z.shape[1] // world_size
    rows = slice(rank * b_l, (rank + 1) * b_l)
    x = z[:, rows].clone().requires_grad_()
    loss, a = ReSALoss(TAU, EPS, ITERS, gather=True)(x, h[rows], z_bar[:, rows], h_bar[rows])
    loss.backward()
    return loss.detach(), a, x.grad


@pytest.mark.dist
def test_distributed_module_equals_single_process_on_concatenated_batch():
    """Fused ReSALoss on 2 ranks (gather + all-reduced Sinkhorn): stacked A rows, mean loss and W x gradient rows
    equal the single-process reference on the whole batch."""
    z, h, z_bar, h_bar = _inputs((3, 2, 8, 6, 5), torch.float32, seed=9)
    out = run_distributed(_module_worker, 2, z, h, z_bar, h_bar)
    a64 = self_assignment(h.double(), h_bar.double(), EPS, ITERS)
    z64 = z.double().requires_grad_()
    ref = resa_cross_entropy(z64, z_bar.double(), a64, TAU)
    ref.backward()
    torch.testing.assert_close(torch.cat([o[1] for o in out]).double(), a64, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack([o[0] for o in out]).mean().double(), ref.detach(), rtol=1e-5, atol=0)
    grad = torch.cat([o[2] for o in out], dim=1).double()
    torch.testing.assert_close(grad, 2 * z64.grad, rtol=0, atol=1e-5 * 2 * z64.grad.abs().max().item())
