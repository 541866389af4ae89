"""[2] Device-side batched augmentation: uint8 crops in, normalised (bf16/fp16/fp32) views out.

The loader delivers crop (+ usually flip) as uint8 ``(B, 3, H, W)`` views; :class:`DeviceAugment` applies the rest of
each view's recipe (``ViewConfig``) on the batch's device, in DINO/BYOL order::

    [flip] -> colour jitter (p, random op order) -> grayscale (p) -> Gaussian blur (p) -> solarize (p)
           -> normalise -> cast -> [channels-last]

* Views with the same recipe and size are stacked into one call (DINO's locals: one ``(8B, 3, 96, 96)`` batch).
* Per-sample parameters are drawn on the **host** from one seeded CPU generator: the grouping (which samples blur,
  which op comes first) is known without a device sync, draws do not depend on the device, and with ``step`` given
  they are a pure function of ``(seed, step)`` (resume needs no state). Under DDP pass ``seed + rank``.
* Colour jitter: ``jitter_impl="exact"`` (torchvision float semantics, HSV hue) or ``"fused"`` (one per-sample affine
  colour map from uint8 in one matmul; deviation in :func:`pipeline.augment.augment_ops.jitter_matrices`).
* ``compile=True`` runs the elementwise stages through ``torch.compile`` (fixed shapes, per-sample masks).
* CPU batches (``cpu_impl="kernel"``) use numba kernels with the same results to float32 rounding
  (``color_kernel``, ``blur_ops``); ``"torch"`` (and every other device) the torch ops.
* Views are stacked into one contiguous NCHW uint8 tensor first. Costs per batch: ``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from pipeline.augment import augment_ops as ops
from pipeline.augment import blur_ops, color_kernel
from pipeline.batch import Batch
from pipeline.config import ViewConfig
from runtime.seeding import Stream, derive_seed


@dataclass
class ViewParams:
    """Per-sample random parameters of N samples (host tensors).

    Attributes:
        flip, jitter, gray, blur, solarize: (N,) bool - whether each op is applied to each sample.
        order: (N, 4) int64 - per-sample permutation of jitter op ids (brightness, contrast, saturation, hue).
        factors: (N, 4) float32 - brightness/contrast/saturation factors and the hue shift (turns).
        sigma: (N,) float32 - blur standard deviation in output pixels.
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def sample_params(view: ViewConfig, n: int, gen: torch.Generator) -> ViewParams:
    """Draw the parameters of ``n`` samples of ``view``; always consumes the same number of draws for a given n."""
    u = torch.rand(n, 6, generator=gen)  # one column per Bernoulli + the blur sigma
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)  # uniform random permutations, like randperm(4)
    lo = torch.tensor([max(0.0, 1.0 - view.brightness), max(0.0, 1.0 - view.contrast),
                       max(0.0, 1.0 - view.saturation), -view.hue])
    hi = torch.tensor([1.0 + view.brightness, 1.0 + view.contrast, 1.0 + view.saturation, view.hue])
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=gen)
    s_lo, s_hi = view.blur_sigma
    return ViewParams(
        flip=u[:, 0] < view.flip_p,
        jitter=u[:, 1] < view.jitter_p,
        order=order,
        factors=factors,
        gray=u[:, 2] < view.grayscale_p,
        blur=u[:, 3] < view.blur_p,
        sigma=s_lo + (s_hi - s_lo) * u[:, 4],
        solarize=u[:, 5] < view.solarize_p,
    )


def _recipe_key(view: ViewConfig) -> tuple:
    """Views with equal keys share one stacked call (role and count do not affect the pixels)."""
    return dataclasses.astuple(dataclasses.replace(view, role="global", count=1))


def _jitter_enabled(view: ViewConfig) -> tuple[bool, bool, bool, bool]:
    return (view.brightness > 0, view.contrast > 0, view.saturation > 0, view.hue > 0)


def fused_color_stage(x: torch.Tensor, flip: torch.Tensor | None, m_mat: torch.Tensor, b_vec: torch.Tensor):
    """The ``torch.compile`` target of the fused path: [flip] + uint8 -> float + affine colour map (jitter and
    grayscale folded in): (N, 3, H, W) uint8 -> float32 in [0, 1]. Masks, not subsets: shapes stay fixed."""
    if flip is not None:
        x = ops.hflip(x, flip)
    return ops.apply_color_matrix_pointwise(x, m_mat, b_vec)


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per-sample channel means in [0, 1]: (N, 3, H, W) uint8 -> (N, 3) float32 (flip-invariant). Compiled, one
    pass over the uint8 input (eagerly a float copy of the input is made first, far slower on a CPU)."""
    return x.sum(dim=(2, 3), dtype=torch.float32) / (255.0 * x.shape[2] * x.shape[3])


def exact_color_stage(x: torch.Tensor, flip: torch.Tensor | None, order: torch.Tensor, factors: torch.Tensor,
                      active: torch.Tensor, gray: torch.Tensor | None, hue_on: bool) -> torch.Tensor:
    """The ``torch.compile`` target of the exact path: [flip] + uint8 -> float + exact jitter (pointwise
    formulation, two fused passes) + [grayscale]: (N, 3, H, W) uint8 -> float32 in [0, 1]."""
    if flip is not None:
        x = ops.hflip(x, flip)
    return ops.color_jitter_pointwise(x, order, factors, active, gray, hue_on)


def finish_stage(x: torch.Tensor, sol: torch.Tensor | None, scale: torch.Tensor, bias: torch.Tensor,
                 dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """[solarize] + normalise + cast + layout: (N, 3, H, W) float32 in [0, 1] -> ``dtype``, normalised.

    ``sol`` (N,) bool selects the samples to solarize (None = none). One output allocation in the final dtype and
    memory format; eagerly the normalise, cast and layout change are a single pass.
    """
    if sol is not None:
        x = ops.solarize(x, sol)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if torch.compiler.is_compiling():  # inductor fuses it all anyway and keeps eager's output strides for this form
        return ops.normalize(x, scale, bias).to(dtype).contiguous(memory_format=fmt)
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    return ops.normalize(x, scale, bias, out=out)


class DeviceAugment:
    """Batched per-view augmentation of a :class:`Batch` on its device.

    Args:
        views: one ViewConfig per crop (``DataConfig.expanded_views()``), in the batch's view order.
        mean: per-channel normalisation mean (RGB, [0, 1] scale).
        std: per-channel normalisation std.
        out_dtype: dtype of the output views (the autocast dtype: bf16 / fp16 / fp32).
        channels_last: return NHWC-strided views (faster convs with channels-last models).
        seed: seed of the host generator; use a different one per rank.
        compile: ``torch.compile`` the elementwise stages (first call per shape pays the compile).
        flip: apply the per-sample horizontal flip here (``ViewConfig.flip_p``); False when the loader flipped.
    """

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float],
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False, seed: int = 0,
                 compile: bool = False, flip: bool = False):
        if not views:
            raise ValueError("DeviceAugment: at least one view is required")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"DeviceAugment: mean/std need 3 values and std > 0, got mean={mean} std={std}")
        self.views = list(views)
        self.scale = 1.0 / torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.bias = -torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1) * self.scale
        self.out_dtype, self.channels_last, self.flip, self.seed = out_dtype, channels_last, flip, seed
        self.generator = torch.Generator().manual_seed(seed)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        groups: dict[tuple, list[int]] = {}
        for i, v in enumerate(self.views):
            groups.setdefault(_recipe_key(v), []).append(i)
        self.groups: list[list[int]] = list(groups.values())
        self.compiled = compile
        self._color: Callable = fused_color_stage
        self._finish: Callable = finish_stage
        self._color_exact: Callable = exact_color_stage
        self._means: Callable = channel_means
        if compile:  # fixed-shape stages: one compile per (view size, stack size, which optional ops are on)
            self._color = torch.compile(fused_color_stage, dynamic=False)
            self._color_exact = torch.compile(exact_color_stage, dynamic=False)
            self._finish = torch.compile(finish_stage, dynamic=False)
            self._means = torch.compile(channel_means, dynamic=False)

    def _norm_consts(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation scale/bias on ``dev``, copied there once."""
        if dev not in self._consts:
            self._consts[dev] = (self.scale.to(dev), self.bias.to(dev))
        return self._consts[dev]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __call__(self, batch: Batch, step: int | None = None) -> Batch:
        """Augment every view; ``step`` (optional) reseeds from ``(seed, step)`` so resuming needs only the step.

        Returns:
            A new Batch with ``augmented=True`` and views of dtype ``out_dtype`` (B, 3, H_v, W_v).
        """
        self._check(batch)
        if step is not None:
            self.generator.manual_seed(derive_seed(Stream.DEVICE_AUGMENT, self.seed, step))
        out: list[torch.Tensor | None] = [None] * len(self.views)
        b = batch.batch_size
        for idx in self.groups:
            view = self.views[idx[0]]
            x = _stack_contiguous([batch.views[i] for i in idx])
            params = sample_params(view, x.shape[0], self.generator)
            y = self.augment_stacked(x, view, params)
            for j, i in enumerate(idx):
                out[i] = y[j * b : (j + 1) * b]
        return Batch(out, batch.labels, batch.indices, batch.n_global, augmented=True)

    def _check(self, batch: Batch) -> None:
        if batch.augmented:
            raise ValueError("DeviceAugment: batch is already augmented (loader ran the full PIL recipe?)")
        if len(batch.views) != len(self.views):
            raise ValueError(f"DeviceAugment: batch has {len(batch.views)} views, the recipe has {len(self.views)}")
        for i, (x, v) in enumerate(zip(batch.views, self.views)):
            if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] != batch.batch_size:
                raise ValueError(f"DeviceAugment: view {i} must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
            if tuple(x.shape[2:]) != (v.size, v.size):
                raise ValueError(f"DeviceAugment: view {i} is {tuple(x.shape[2:])}, its ViewConfig.size is {v.size}")

    def augment_stacked(self, x: torch.Tensor, view: ViewConfig, p: ViewParams) -> torch.Tensor:
        """One recipe on a stack of samples: (N, 3, H, W) uint8 -> (N, 3, H, W) ``out_dtype``, normalised."""
        dev = x.device
        flip = p.flip if self.flip and bool(p.flip.any()) else None
        with record_function(f"augment/color_{view.jitter_impl}"):  # profiler ranges, ~free when not profiling
            if view.jitter_impl == "fused":
                y = self._fused_color(x, view, p, flip)
            else:
                y = self._exact_color(x, view, p, flip)
        if bool(p.blur.any()):
            size = ops.blur_kernel_size(view.blur_sigma[1], view.blur_kernel)
            with record_function("augment/blur"):
                y = blur_ops.blur_selected(y, p.blur, p.sigma, size, view.cpu_impl)
        scale, bias = self._norm_consts(dev)
        sol = p.solarize if bool(p.solarize.any()) else None
        with record_function("augment/finish"):
            if self.compiled:  # fixed shapes: masks instead of subsets, fused into one kernel by inductor
                sol = None if sol is None else sol.to(dev, non_blocking=True)
                return self._finish(y, sol, scale, bias, self.out_dtype, self.channels_last)
            if sol is not None:
                y = ops.on_subset(y, sol, lambda t, sel: ops.solarize(t))
            return finish_stage(y, None, scale, bias, self.out_dtype, self.channels_last)

    def _fused_color(self, x: torch.Tensor, view: ViewConfig, p: ViewParams, flip: torch.Tensor | None):
        dev = x.device
        n = x.shape[0]
        # A zero strength samples the identity factor (1, or a 0 hue shift), so disabled ops need no special case.
        if any(_jitter_enabled(view)) and bool(p.jitter.any()):
            means = self._means(x)
            m_mat, b_vec = ops.jitter_matrices(p.order.to(dev), p.factors.to(dev), p.jitter.to(dev), means)
        else:
            m_mat, b_vec = torch.eye(3, device=dev).expand(n, 3, 3), torch.zeros(n, 3, device=dev)
        if bool(p.gray.any()):
            m_mat, b_vec = ops.grayscale_matrix(p.gray.to(dev), m_mat, b_vec)
        m_mat, b_vec = m_mat.contiguous(), b_vec.contiguous()
        if self.compiled:
            return self._color(x, None if flip is None else flip.to(dev, non_blocking=True), m_mat, b_vec)
        if flip is not None:
            x = ops.on_subset(x, flip, lambda t, sel: t.flip(-1))
        return ops.apply_color_matrix_u8(x, m_mat, b_vec)

    def _exact_color(self, x: torch.Tensor, view: ViewConfig, p: ViewParams, flip: torch.Tensor | None):
        dev = x.device
        enabled = _jitter_enabled(view)
        if view.cpu_impl == "kernel" and color_kernel.kernel_available(x):  # CPU: one pass instead of one per op
            if flip is not None:
                x = ops.on_subset(x, flip, lambda t, sel: t.flip(-1))
            gray = p.gray if bool(p.gray.any()) else None
            return color_kernel.color_exact_cpu(x, p.order, p.factors, p.jitter, enabled, gray)
        if self.compiled:
            to = lambda t: None if t is None else t.to(dev, non_blocking=True)  # noqa: E731
            active = p.jitter & any(enabled)  # a disabled op samples the exact identity factor (1 or no hue)
            return self._color_exact(x, to(flip), to(p.order), to(p.factors), to(active),
                                     to(p.gray if bool(p.gray.any()) else None), enabled[3])
        if flip is not None:
            x = ops.on_subset(x, flip, lambda t, sel: t.flip(-1))
        y = ops.to_float01(x)
        if any(enabled) and bool(p.jitter.any()):
            factors = p.factors.to(dev, non_blocking=True)
            y = ops.color_jitter_exact(y, p.order, factors, p.jitter, enabled)
        if bool(p.gray.any()):
            y = ops.on_subset(y, p.gray, lambda t, sel: ops.grayscale(t).expand_as(t))
        return y


def _stack_contiguous(views: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate uint8 (B, 3, H, W) views into one contiguous (NCHW) tensor in a single copy (none if a lone view
    is contiguous already). Loaders may deliver channels-last crops (FFCV's HWC buffers); transposing the uint8
    input here costs ~2.6 ms per 64 x 224 px on one CPU thread, whereas the compiled colour stage writing NCHW float
    from NHWC uint8 cost 12 ms more than from NCHW, and the blur and finish stages keep the layout they get."""
    if len(views) == 1 and views[0].is_contiguous():
        return views[0]
    b, c, h, w = views[0].shape
    out = torch.empty((b * len(views), c, h, w), dtype=views[0].dtype, device=views[0].device)
    for j, v in enumerate(views):
        out[j * b : (j + 1) * b].copy_(v)
    return out
