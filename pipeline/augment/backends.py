"""The backend table of ``DeviceAugment``: every implementation of every stage, named once.

A view recipe runs as three stages on a stack of N samples::

    color_<jitter_impl>: [flip] + uint8 -> float32 + colour jitter + grayscale   (N, 3, H, W) uint8 -> float32 [0, 1]
    blur:                Gaussian blur of the selected samples                    float32 -> float32
    finish:              [solarize] + normalise + cast + layout                   float32 -> out dtype

:data:`BACKENDS` maps ``(stage, backend)`` to its implementation; :func:`resolve` picks one per call from the
tensor and the :class:`pipeline.config.AugmentConfig` switches. Backends:

* ``eager`` - torch ops, any device. ``("color_exact", "eager")`` is the reference (torchvision float semantics);
* ``compiled`` - fixed-shape formulations for ``torch.compile`` (masks instead of subsets), used with ``compile=True``;
* ``kernel`` - numba kernels for CPU tensors (same results to float32 rounding), used with ``cpu_impl="kernel"``.

``color_fused`` is the fast approximation (one affine colour map per sample, ``color_matrix``); every other
colour backend computes the reference's result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.augment import blur_kernel, color_kernel
from pipeline.augment.blur_ops import gaussian_blur
from pipeline.augment.color_matrix import (
    apply_color_matrix_pointwise,
    apply_color_matrix_u8,
    channel_means,
    grayscale_matrix,
    jitter_matrices,
)
from pipeline.augment.color_ops import color_jitter_exact, grayscale
from pipeline.augment.color_pointwise import color_jitter_pointwise
from pipeline.augment.params import ViewParams
from pipeline.augment.pixel_ops import hflip, hflip_subset, normalize, on_subset, solarize, to_float01

Enabled = tuple[bool, bool, bool, bool]  # which jitter ops have a non-zero strength (brightness, contrast, sat., hue)


def fused_color_stage(x: torch.Tensor, flip: torch.Tensor | None, m_mat: torch.Tensor, b_vec: torch.Tensor):
    """The ``torch.compile`` target of the fused path: [flip] + uint8 -> float + affine colour map (jitter and
    grayscale folded in): (N, 3, H, W) uint8 -> float32 in [0, 1]. Masks, not subsets: shapes stay fixed."""
    if flip is not None:
        x = hflip(x, flip)
    return apply_color_matrix_pointwise(x, m_mat, b_vec)


def exact_color_stage(x: torch.Tensor, flip: torch.Tensor | None, order: torch.Tensor, factors: torch.Tensor,
                      active: torch.Tensor, gray: torch.Tensor | None, hue_on: bool) -> torch.Tensor:
    """The ``torch.compile`` target of the exact path: [flip] + uint8 -> float + exact jitter (pointwise
    formulation, two fused passes) + [grayscale]: (N, 3, H, W) uint8 -> float32 in [0, 1]."""
    if flip is not None:
        x = hflip(x, flip)
    return color_jitter_pointwise(x, order, factors, active, gray, hue_on)


def finish_stage(x: torch.Tensor, sol: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor,
                 dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """[solarize] + normalise + cast + layout: (N, 3, H, W) float32 in [0, 1] -> ``dtype``, normalised.

    ``sol`` (N,) bool selects the samples to solarize (None = none). One output allocation in the final dtype and
    memory format; eagerly the normalise, cast and layout change are a single pass.
    """
    if sol is not None:
        x = solarize(x, sol)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if torch.compiler.is_compiling():  # inductor fuses it all anyway and keeps eager's output strides for this form
        return normalize(x, scale, bias).to(dtype).contiguous(memory_format=fmt)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    return normalize(x, scale, bias, out=out)


class Graphs:
    """The ``torch.compile``'d stage targets of one ``DeviceAugment`` (fixed shapes: one graph per view size, stack
    size and set of optional ops)."""

    def __init__(self) -> None:
        self.color_fused = torch.compile(fused_color_stage, dynamic=False)
        self.color_exact = torch.compile(exact_color_stage, dynamic=False)
        self.finish = torch.compile(finish_stage, dynamic=False)
        self.means = torch.compile(channel_means, dynamic=False)


def selected(mask: torch.Tensor) -> torch.Tensor | None:
    """The host mask (N,) bool if it selects any sample, else None (the op is skipped)."""
    return mask if bool(mask.any()) else None


def _to(t: torch.Tensor | None, dev: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(dev, non_blocking=True)


# ------------------------------------------------------------------ color stage: (x, flip, p, enabled, graphs) -> y


def exact_color_eager(x: torch.Tensor, flip: torch.Tensor | None, p: ViewParams, enabled: Enabled,
                      graphs: Graphs | None) -> torch.Tensor:
    """The reference: torchvision's float ops, each run once per pixel on the samples regrouped per op position."""
    y = to_float01(hflip_subset(x, flip))
    if any(enabled) and bool(p.jitter.any()):
        y = color_jitter_exact(y, p.order, p.factors.to(x.device, non_blocking=True), p.jitter, enabled)
    if bool(p.gray.any()):
        y = on_subset(y, p.gray, lambda t, sel: grayscale(t).expand_as(t))
    return y


def exact_color_compiled(x: torch.Tensor, flip: torch.Tensor | None, p: ViewParams, enabled: Enabled,
                         graphs: Graphs) -> torch.Tensor:
    """The reference's result as the compiled pointwise formulation (masks, two fused passes)."""
    dev = x.device
    active = p.jitter & any(enabled)  # a disabled op samples the exact identity factor (1 or no hue)
    return graphs.color_exact(x, _to(flip, dev), _to(p.order, dev), _to(p.factors, dev), _to(active, dev),
                              _to(selected(p.gray), dev), enabled[3])


def exact_color_kernel(x: torch.Tensor, flip: torch.Tensor | None, p: ViewParams, enabled: Enabled,
                       graphs: Graphs | None) -> torch.Tensor:
    """The reference's result in one numba pass per sample (CPU uint8 input)."""
    return color_kernel.color_exact_cpu(hflip_subset(x, flip), p.order, p.factors, p.jitter, enabled,
                                        selected(p.gray))


def _color_matrices(x: torch.Tensor, p: ViewParams, enabled: Enabled, means: Callable):
    """Per-sample affine colour maps of the fused path: ``M`` (N, 3, 3), ``b`` (N, 3) on x's device, contiguous."""
    dev, n = x.device, x.shape[0]
    # A zero strength samples the identity factor (1, or a 0 hue shift), so disabled ops need no special case.
    if any(enabled) and bool(p.jitter.any()):
        mu = means(x)
        m_mat, b_vec = jitter_matrices(p.order.to(dev), p.factors.to(dev), p.jitter.to(dev), mu)
    else:
        m_mat, b_vec = torch.eye(3, device=dev).expand(n, 3, 3), torch.zeros(n, 3, device=dev)
    if bool(p.gray.any()):
        m_mat, b_vec = grayscale_matrix(p.gray.to(dev), m_mat, b_vec)
    return m_mat.contiguous(), b_vec.contiguous()


def fused_color_eager(x: torch.Tensor, flip: torch.Tensor | None, p: ViewParams, enabled: Enabled,
                      graphs: Graphs | None) -> torch.Tensor:
    """The fast approximation, eagerly: flip on the subset, then one batched matmul from uint8."""
    m_mat, b_vec = _color_matrices(x, p, enabled, channel_means)
    return apply_color_matrix_u8(hflip_subset(x, flip), m_mat, b_vec)


def fused_color_compiled(x: torch.Tensor, flip: torch.Tensor | None, p: ViewParams, enabled: Enabled,
                         graphs: Graphs) -> torch.Tensor:
    """The fast approximation, compiled: flip mask + colour map fused into one loop over the uint8 input."""
    m_mat, b_vec = _color_matrices(x, p, enabled, graphs.means)
    return graphs.color_fused(x, _to(flip, x.device), m_mat, b_vec)


# ------------------------------------------------------------------ blur stage: (y, mask, sigma, size) -> y


def blur_eager(y: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Grouped convolution on the selected subset (host ``mask``/``sigma`` (N,)); a new tensor."""
    return on_subset(y, mask, lambda t, sel: gaussian_blur(t, sigma[sel].to(y.device), size))


# ------------------------------------------------------------------ finish stage


def finish_eager(y: torch.Tensor, sol: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor,
                 dtype: torch.dtype, channels_last: bool, graphs: Graphs | None) -> torch.Tensor:
    """Solarize the selected subset, then normalise + cast + layout in one pass."""
    if sol is not None:
        y = on_subset(y, sol, lambda t, sel: solarize(t))
    return finish_stage(y, None, scale, bias, dtype, channels_last)


def finish_compiled(y: torch.Tensor, sol: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor,
                    dtype: torch.dtype, channels_last: bool, graphs: Graphs) -> torch.Tensor:
    """Solarize mask + normalise + cast + layout fused into one kernel by inductor."""
    return graphs.finish(y, _to(sol, y.device), scale, bias, dtype, channels_last)


# ------------------------------------------------------------------ the table


def _any_input(x: torch.Tensor) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """One implementation of a stage and the inputs it takes (kernels: CPU tensors of one dtype, numba present)."""

    fn: Callable
    accepts: Callable[[torch.Tensor], bool] = _any_input


BACKENDS: dict[tuple[str, str], Backend] = {
    ("color_exact", "eager"): Backend(exact_color_eager),
    ("color_exact", "compiled"): Backend(exact_color_compiled),
    ("color_exact", "kernel"): Backend(exact_color_kernel, color_kernel.kernel_available),
    ("color_fused", "eager"): Backend(fused_color_eager),
    ("color_fused", "compiled"): Backend(fused_color_compiled),
    ("blur", "eager"): Backend(blur_eager),
    ("blur", "kernel"): Backend(blur_kernel.blur_selected_cpu_, blur_kernel.direct_blur_available),
    ("finish", "eager"): Backend(finish_eager),
    ("finish", "compiled"): Backend(finish_compiled),
}


def resolve(stage: str, x: torch.Tensor, cpu_impl: str, compiled: bool) -> Callable:
    """The implementation of ``stage`` for input ``x``: the first of ``kernel`` (if ``cpu_impl == "kernel"``),
    ``compiled`` (if ``compiled``), ``eager`` that the table holds and that accepts ``x``."""
    for backend in ("kernel",) * (cpu_impl == "kernel") + ("compiled",) * compiled + ("eager",):
        entry = BACKENDS.get((stage, backend))
        if entry is not None and entry.accepts(x):
            return entry.fn
    raise KeyError(f"no backend of stage {stage!r}; the table has {sorted({s for s, _ in BACKENDS})}")
