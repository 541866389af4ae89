"""Fused loss kernels, each next to the reference it replaces, behind one switch.

``use_fused()`` decides whether a loss module runs its fused path (Triton on CUDA, a ``torch.compile``'d chunked
path on CPU) or the reference tensor functions, which stay the documented definition. The environment variable
``FLASHSSL_FUSED`` (``0``/``1``) overrides the default; ``set_fused()`` overrides both (tests, benchmarks).

Default: off. The reference is kept as the default until a measured speed-up is shown on the target device
(see ``docs/kernels.md`` and ``python -m losses.kernels.bench``).
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
