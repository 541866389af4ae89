"""Fused ReSSL relation cross-entropy (one autograd Function; Triton queue attention under TRITON_INTERPRET=1, the
chunked compiled one on CPU) against the reference.

The reference is ``losses.ressl`` evaluated in float64 (itself checked against a naive loop in ``test_ressl.py``).
Tolerances: fp32 inputs -> loss rel 1e-5, gradient atol 1e-5 * max|grad|; bf16 inputs (the reference sees the
same bf16-rounded values in float64) -> loss rel 1e-5, gradient atol 1e-2 * max|grad| (bf16 gradient store).
"""

from __future__ import annotations

# first: sets TRITON_INTERPRET=1 before triton is imported, or tells that it came too late (see the module)
from tests.losses import triton_interpret

_TRITON_PREIMPORTED = triton_interpret.PREIMPORTED

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from losses import kernels  # noqa: E402
from losses.kernels import relation_ce_compiled as compiled_mod  # noqa: E402
from losses.kernels.relation_ce import relation_ce  # noqa: E402
from losses.ressl import ReSSLLoss, relation_targets, ressl_cross_entropy  # noqa: E402

TAU_S, TAU_T = 0.1, 0.04
# (S, B, D, K): K and D not multiples of the blocks (BLOCK_N 64, BLOCK_M 16), rows (S+1)*B across two M blocks.
SHAPES = [(2, 5, 24, 300), (1, 3, 16, 64), (3, 7, 40, 130)]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(shape, dtype, seed=0):
    s_n, b_n, d_n, k_n = shape
    gen = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(s_n, b_n, d_n, generator=gen), dim=-1).to(dtype)
    teacher = F.normalize(torch.randn(b_n, d_n, generator=gen), dim=-1).to(dtype)
    queue = F.normalize(torch.randn(k_n, d_n, generator=gen), dim=-1).to(dtype)
    return student, teacher, queue


def _check(fn, shape, dtype):
    student, teacher, queue = _inputs(shape, dtype)
    s64 = student.double().requires_grad_()
    ref = ressl_cross_entropy(s64, relation_targets(teacher.double(), queue.double(), TAU_T), queue.double(), TAU_S)
    ref.backward()
    x = student.clone().requires_grad_()
    loss = fn(x, teacher, queue, TAU_S, TAU_T)
    (2.0 * loss).backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    tol = GRAD_TOL[dtype] * 2.0 * s64.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), 2.0 * s64.grad, rtol=0, atol=tol)


@pytest.mark.skipif(not kernels.has_triton() or _TRITON_PREIMPORTED, reason="triton missing or imported already")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    from losses.kernels.relation_ce_triton import relation_ce_triton
    _check(relation_ce_triton, shape, dtype)


def _exact_attention(x, queue, inv_t):
    """Queue attention in float64 without tiling: lse and softmax-weighted queue mean of every row."""
    z = (x.double() @ queue.double().T) * inv_t.double().unsqueeze(-1)
    return torch.logsumexp(z, dim=-1), torch.softmax(z, dim=-1) @ queue.double()


def test_function_with_exact_attention_matches_reference():
    """The shared autograd Function (loss identity and saved ``u - v`` backward) with an untiled float64 attention.
    The per-row 1/temp is an fp32 tensor, so tau_s = 0.1 enters with fp32 rounding: rel 1e-6."""
    student, teacher, queue = (t.double() for t in _inputs((3, 7, 40, 130), torch.float32))
    s64 = student.clone().requires_grad_()
    ref = ressl_cross_entropy(s64, relation_targets(teacher, queue, TAU_T), queue, TAU_S)
    ref.backward()
    x = student.clone().requires_grad_()
    loss = relation_ce(x, teacher, queue, TAU_S, TAU_T, _exact_attention)
    (2.0 * loss).backward()
    assert x.grad.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, 2.0 * s64.grad, rtol=0, atol=1e-6 * s64.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_eager_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(compiled_mod, "CHUNK_ELEMS", 4 * shape[3])  # 4 rows per chunk: several chunks + remainder

    def fn(*args):
        return compiled_mod.relation_ce_compiled(*args, compile=False)
    _check(fn, shape, dtype)


@pytest.mark.slow
def test_compiled_matches_reference(monkeypatch):
    monkeypatch.setattr(compiled_mod, "CHUNK_ELEMS", 4 * 300)
    _check(compiled_mod.relation_ce_compiled, (2, 5, 24, 300), torch.float32)


@pytest.mark.skipif(not kernels.has_triton() or _TRITON_PREIMPORTED, reason="triton missing or imported already")
def test_ressl_loss_dispatch_matches_reference_over_steps():
    """Same loss, gradient and queue over three steps (forward, backward, enqueue) with the switch on and off."""
    mods = {flag: ReSSLLoss(dim=24, queue_size=100, init_seed=3) for flag in (False, True)}
    try:
        for step in range(3):
            student, teacher, _ = _inputs((2, 6, 24, 1), torch.float32, seed=step)
            out = {}
            for flag, mod in mods.items():
                kernels.set_fused(flag)
                x = student.clone().requires_grad_()
                loss = mod(x, teacher)
                loss.backward()
                mod.enqueue(teacher)
                out[flag] = (loss.detach(), x.grad)
            torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
            torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-5 * out[False][1].abs().max())
            torch.testing.assert_close(mods[True].queue, mods[False].queue, rtol=0, atol=0)
            assert int(mods[True].queue_ptr) == int(mods[False].queue_ptr)
    finally:
        kernels.set_fused(None)


@pytest.mark.skipif(not kernels.has_triton() or not _TRITON_PREIMPORTED, reason="Triton cases ran in this process")
def test_triton_cases_in_fresh_process():
    triton_interpret.rerun_triton_cases(__file__)
