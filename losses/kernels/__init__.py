"""Fused loss kernels, each next to the reference it replaces, behind one switch.

``use_fused()`` decides whether a loss module runs its fused path (Triton on CUDA, a ``torch.compile``'d chunked
path on CPU) or the reference tensor functions, which stay the documented definition. The environment variable
``FLASHSSL_FUSED`` (``0``/``1``) overrides the default; ``set_fused()`` overrides both (tests, benchmarks).

Default: off. The reference is kept as the default until a measured speed-up is shown on the target device
(see ``docs/kernels.md`` and ``python -m benchmarks.kernels``). ReSA, INTL, CW-RGP and MV-MR ask
``fused_for(loss, device)``, which also keeps a loss on its reference on CPU where the compiled path was measured
not faster (``CPU_REFERENCE_FASTER``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_FORCED: bool | None = None


def _env_flag() -> bool | None:
    raw = os.environ.get("FLASHSSL_FUSED")
    if raw is None or raw.strip() == "":
        return None
    if raw.strip() in ("0", "1"):
        return raw.strip() == "1"
    raise ValueError(f"environment variable FLASHSSL_FUSED must be '0' or '1', got {raw!r}")


def set_fused(enabled: bool | None) -> None:
    """Force the fused paths on/off for this process; ``None`` returns to the env var / default."""
    global _FORCED
    _FORCED = enabled


def use_fused() -> bool:
    """True when losses should take their fused path: ``set_fused`` > ``FLASHSSL_FUSED`` > default (False)."""
    if _FORCED is not None:
        return _FORCED
    env = _env_flag()
    return bool(env) if env is not None else False


# Losses whose compiled CPU path was not measured faster than the reference (docs/kernels.md, bench table): with
# FLASHSSL_FUSED=1 they keep the reference on CPU; set_fused(True) still forces the fused path (tests, benchmarks).
CPU_REFERENCE_FASTER = frozenset({"cw_rgp"})


def fused_for(loss: str, device: torch.device) -> bool:
    """``use_fused()`` for one loss on one device: a forced ``set_fused`` wins; otherwise the switch, except on CPU
    for the losses in ``CPU_REFERENCE_FASTER`` (their reference measured as fast or faster there)."""
    if _FORCED is not None:
        return _FORCED
    return use_fused() and (device.type != "cpu" or loss not in CPU_REFERENCE_FASTER)


def has_triton() -> bool:
    """True when the ``triton`` package is importable."""
    return importlib.util.find_spec("triton") is not None


def triton_ok(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can run on these tensors: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not has_triton():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in tensors)


def soft_ce_fused(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                  student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused DINO/SCFS multi-crop soft CE: Triton where it can run, else the compiled CPU path.

    Shapes as ``losses.dino.multicrop_cross_entropy``: (S, B, K), (T, B, K), (K,) -> (scalar loss, (K,) column sum
    of the raw teacher logits, for the center update).
    """
    if triton_ok(student_logits, teacher_logits, center):
        from losses.kernels.soft_ce_triton import soft_ce_triton
        return soft_ce_triton(student_logits, teacher_logits, center, student_temp, teacher_temp)
    from losses.kernels.soft_ce_compiled import soft_ce_compiled
    return soft_ce_compiled(student_logits, teacher_logits, center, student_temp, teacher_temp)


def relation_ce_fused(student: torch.Tensor, teacher: torch.Tensor, queue: torch.Tensor, student_temp: float,
                      teacher_temp: float) -> torch.Tensor:
    """Fused ReSSL relation CE: Triton where it can run, else the compiled CPU path.

    Shapes as ``losses.ressl.ressl_cross_entropy``: student (S, B, D), teacher (B, D), queue (K, D) -> scalar.
    """
    if triton_ok(student, teacher, queue):
        from losses.kernels.relation_ce_triton import relation_ce_triton
        return relation_ce_triton(student, teacher, queue, student_temp, teacher_temp)
    from losses.kernels.relation_ce_compiled import relation_ce_compiled
    return relation_ce_compiled(student, teacher, queue, student_temp, teacher_temp)


def distance_correlations_fused(y: torch.Tensor, xs: list[torch.Tensor], y_clamp: float,
                                x_clamps: list[float]) -> torch.Tensor:
    """Fused MV-MR distance correlations ``dCor(x_r, y)`` sharing ``y``'s centred distance matrix (compiled path;
    on CUDA the same compiled code runs). Shapes as ``losses.mvmr.distance_correlation``: y (N, Q), xs R x (N, P_r)
    -> (R,) fp32."""
    from losses.kernels.dcor_compiled import distance_correlations_compiled
    return distance_correlations_compiled(y, xs, y_clamp, x_clamps)


def self_assignment_fused(h: torch.Tensor, h_bar: torch.Tensor, eps: float, n_iters: int,
                          distributed: bool = False) -> torch.Tensor:
    """Fused ReSA Sinkhorn self-assignment (compiled scaling form). Shapes as ``losses.resa.self_assignment``:
    h (B_l, E), h_bar (B, E) -> (B_l, B) fp32."""
    from losses.kernels.resa_compiled import self_assignment_compiled
    return self_assignment_compiled(h, h_bar, eps, n_iters, distributed)


def resa_cross_entropy_fused(z: torch.Tensor, z_bar: torch.Tensor, assignment: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Fused ReSA assignment cross-entropy (compiled, one pass per view pair). Shapes as
    ``losses.resa.resa_cross_entropy``: z (V, B_l, D), z_bar (M, B, D), A (B_l, B) -> scalar fp32."""
    from losses.kernels.resa_compiled import resa_cross_entropy_compiled
    return resa_cross_entropy_compiled(z, z_bar, assignment, temperature)


def iternorm_whiten_fused(x: torch.Tensor, iters: int = 4, axis: int = 0) -> torch.Tensor:
    """Fused INTL IterNorm (hand-written backward, compiled pieces). Shapes as
    ``losses.whitening.iternorm_whiten``: (..., N, D) -> (..., N, D)."""
    from losses.kernels.whiten_compiled import iternorm_whiten_compiled
    return iternorm_whiten_compiled(x, iters, axis)


def group_channel_whiten_fused(x: torch.Tensor, channel_perm: torch.Tensor, groups: int, eps: float = 0.0,
                               minus: int = 1) -> torch.Tensor:
    """Fused CW-RGP grouped ZCA channel whitening (closed-form inverse-sqrt adjoint, compiled pieces). Shapes as
    ``losses.whitening.group_channel_whiten``: (..., n, D), (..., D) -> (..., n, D)."""
    from losses.kernels.whiten_compiled import group_channel_whiten_compiled
    return group_channel_whiten_compiled(x, channel_perm, groups, eps, minus)
