"""Fused DINO/SCFS soft cross-entropy (Triton under TRITON_INTERPRET=1, compiled CPU path) against the reference.

The reference is ``losses.dino`` evaluated in float64 (itself checked against a naive loop in ``test_dino.py``).
Tolerances: fp32 inputs -> loss rel 1e-5, gradient atol 1e-5 * max|grad|; bf16 inputs (the reference sees the
same bf16-rounded values in float64, so only fp32 accumulation and the bf16 gradient store differ) -> loss rel
1e-5, gradient atol 1e-2 * max|grad| (bf16 has an 8-bit mantissa). Center batch sum: atol 1e-4 * sqrt(T * B).
"""

from __future__ import annotations

# first: sets TRITON_INTERPRET=1 before triton is imported, or tells that it came too late (see the module)
from tests.losses import triton_interpret

_TRITON_PREIMPORTED = triton_interpret.PREIMPORTED

import pytest  # noqa: E402
import torch  # noqa: E402

from losses import kernels  # noqa: E402
from losses.dino import DINOLoss, multicrop_cross_entropy, teacher_probs  # noqa: E402
from losses.kernels import soft_ce_compiled as compiled_mod  # noqa: E402

TAU_S, TAU_T = 0.1, 0.04
# (S, T, B, K): K below, above and exactly at the Triton block (1024), with a tail; S == T; T == 1.
SHAPES = [(3, 2, 2, 1000), (4, 2, 3, 2500), (2, 2, 1, 1024), (3, 1, 2, 77)]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(shape, dtype, seed=0):
    s_n, t_n, b_n, k_n = shape
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(s_n, b_n, k_n, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(t_n, b_n, k_n, generator=gen) * 3).to(dtype)
    center = torch.randn(k_n, generator=gen) * 0.5
    return student, teacher, center


def _reference(student, teacher, center):
    """Loss, d loss / d student and the teacher column sum, all in float64."""
    s64 = student.double().requires_grad_()
    loss = multicrop_cross_entropy(s64, teacher_probs(teacher.double(), center.double(), TAU_T), TAU_S)
    loss.backward()
    return loss.detach(), s64.grad, teacher.double().sum(dim=(0, 1))


def _check(fn, shape, dtype):
    student, teacher, center = _inputs(shape, dtype)
    ref_loss, ref_grad, ref_sum = _reference(student, teacher, center)
    x = student.clone().requires_grad_()
    loss, col_sum = fn(x, teacher, center, TAU_S, TAU_T)
    (2.0 * loss).backward()  # upstream gradient != 1 reaches the kernel
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    tol = GRAD_TOL[dtype] * 2.0 * ref_grad.abs().max().item()
    torch.testing.assert_close(x.grad.double(), 2.0 * ref_grad, rtol=0, atol=tol)
    torch.testing.assert_close(col_sum.double(), ref_sum, rtol=0, atol=1e-4 * (shape[1] * shape[2]) ** 0.5)


@pytest.mark.skipif(not kernels.has_triton() or _TRITON_PREIMPORTED, reason="triton missing or imported already")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype):
    from losses.kernels.soft_ce_triton import soft_ce_triton
    _check(soft_ce_triton, shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_eager_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setattr(compiled_mod, "CHUNK_ELEMS", 2 * shape[0] * shape[3])  # 2 rows per chunk: a remainder

    def fn(*args):
        return compiled_mod.soft_ce_compiled(*args, compile=False)
    _check(fn, shape, dtype)


@pytest.mark.slow
def test_compiled_matches_reference(monkeypatch):
    monkeypatch.setattr(compiled_mod, "CHUNK_ELEMS", 2 * 4 * 2500)
    _check(compiled_mod.soft_ce_compiled, (4, 2, 3, 2500), torch.float32)


@pytest.mark.skipif(not kernels.has_triton() or _TRITON_PREIMPORTED, reason="triton missing or imported already")
def test_dino_loss_dispatch_matches_reference_over_steps():
    """Same loss, gradient and center over three steps with the switch on (Triton) and off (reference); the fused
    forward hands out the teacher column sum and the center update takes it."""
    k_n = 1100
    mods = {flag: DINOLoss(k_n, student_temp=TAU_S, center_momentum=0.9) for flag in (False, True)}
    try:
        for step in range(3):
            student, teacher, _ = _inputs((4, 2, 3, k_n), torch.float32, seed=step)
            out = {}
            for flag, mod in mods.items():
                kernels.set_fused(flag)
                x = student.clone().requires_grad_()
                loss, teacher_sum = mod.loss_and_teacher_sum(x, teacher, TAU_T)
                assert (teacher_sum is not None) == flag
                if flag:
                    torch.testing.assert_close(teacher_sum, teacher.sum(dim=(0, 1)), rtol=0, atol=1e-4)
                loss.backward()
                mod.reduce_center_update(teacher, teacher_sum)
                mod.apply_center_update()
                out[flag] = (loss.detach(), x.grad)
            torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
            torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-5 * out[False][1].abs().max())
            torch.testing.assert_close(mods[True].center, mods[False].center, rtol=0, atol=1e-6)
        assert mods[True].center.abs().max() > 0
    finally:
        kernels.set_fused(None)


def test_switch_env_override(monkeypatch):
    kernels.set_fused(None)
    monkeypatch.delenv("FLASHSSL_FUSED", raising=False)
    assert kernels.use_fused() is False
    monkeypatch.setenv("FLASHSSL_FUSED", "1")
    assert kernels.use_fused() is True
    monkeypatch.setenv("FLASHSSL_FUSED", "0")
    assert kernels.use_fused() is False
    kernels.set_fused(True)
    assert kernels.use_fused() is True
    kernels.set_fused(None)
    monkeypatch.setenv("FLASHSSL_FUSED", "yes")
    with pytest.raises(ValueError, match="FLASHSSL_FUSED"):
        kernels.use_fused()


@pytest.mark.skipif(not kernels.has_triton() or not _TRITON_PREIMPORTED, reason="Triton cases ran in this process")
def test_triton_cases_in_fresh_process():
    triton_interpret.rerun_triton_cases(__file__)


def _large_small_case():
    """T 2 globals + 1 local, K 64: teacher 0 puts ~all its mass on class 0, teacher 1 gives it ~1e-3, student crop
    0 gives it little, so dL/dx_0[0] ~ P_1[0]: a fp32 ``Psum - P_0`` would cancel it against P_0[0] ~ 1."""
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 1, 64, generator=gen) * 0.01
    teacher[0, 0, 0] = 1.0  # /tau_t 0.04 -> P_0[0] ~ 1 - 6e-10 * 63
    teacher[1, 0, 0] = -0.2  # P_1[0] ~ exp(-5) / 64 ~ 1e-4
    student = torch.randn(3, 1, 64, generator=gen)
    student[0, 0, 0] = -1.0
    return student, teacher, torch.zeros(64)


def _grad_rel_err_at_small_target(fn, student, teacher, center) -> float:
    _, ref_grad, _ = _reference(student, teacher, center)
    x = student.clone().requires_grad_()
    fn(x, teacher, center, TAU_S, TAU_T)[0].backward()
    return abs(x.grad[0, 0, 0].double().item() - ref_grad[0, 0, 0].item()) / abs(ref_grad[0, 0, 0].item())


def _assert_small_target_at_reference_level(fn):
    """Relative error of dL/dx_0[0] against float64 within 2x the fp32 reference path's (floor 1e-6; the old
    ``Psum - P_s`` form measured 1.6e-4 here)."""
    student, teacher, center = _large_small_case()

    def reference_fp32(x, t, c, ts, tt):
        return multicrop_cross_entropy(x, teacher_probs(t, c, tt), ts), None
    ref_err = _grad_rel_err_at_small_target(reference_fp32, student, teacher, center)
    err = _grad_rel_err_at_small_target(fn, student, teacher, center)
    assert err <= max(2 * ref_err, 1e-6), (err, ref_err)


def test_backward_other_teacher_target_is_not_a_cancellation():
    _assert_small_target_at_reference_level(lambda *a: compiled_mod.soft_ce_compiled(*a, compile=False))


@pytest.mark.skipif(not kernels.has_triton() or _TRITON_PREIMPORTED, reason="triton missing or imported already")
def test_triton_backward_other_teacher_target_is_not_a_cancellation():
    from losses.kernels.soft_ce_triton import soft_ce_triton
    _assert_small_target_at_reference_level(soft_ce_triton)
