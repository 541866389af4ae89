"""[2] Device-side batched augmentation: uint8 crops in, normalised (bf16/fp16/fp32) views out.

The loader delivers crop (+ usually flip) as uint8 ``(B, 3, H, W)`` views; :class:`DeviceAugment` applies the rest of
each view's recipe (``ViewConfig``) on the batch's device, in DINO/BYOL order::

    [flip] -> colour jitter (p, random op order) -> grayscale (p) -> Gaussian blur (p) -> solarize (p)
           -> normalise -> cast -> [channels-last]

* Views with the same recipe and size are stacked into one call (DINO's locals: one ``(8B, 3, 96, 96)`` batch).
* Per-sample parameters are drawn on the host from one seeded CPU generator (:mod:`pipeline.augment.params`); with
  ``step`` given they are a pure function of ``(seed, step)`` (resume needs no state). Under DDP pass ``seed + rank``.
* How each stage runs is looked up in one table (:data:`pipeline.augment.backends.BACKENDS`) from the
  :class:`pipeline.config.AugmentConfig` switches, ``compile`` and the batch's device: ``jitter_impl="exact"``
  (torchvision float semantics) or ``"fused"`` (one per-sample affine colour map); ``cpu_impl="kernel"`` runs CPU
  batches through numba kernels with the same results to float32 rounding; ``compile=True`` runs the elementwise
  stages through ``torch.compile`` (fixed shapes, per-sample masks).
* Views are stacked into one contiguous NCHW uint8 tensor first. Costs per batch: ``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.profiler import record_function

from pipeline.augment import backends
from pipeline.augment.blur_ops import blur_kernel_size
from pipeline.augment.params import ViewParams, sample_params
from pipeline.batch import Batch
from pipeline.config import AugmentConfig, ViewConfig
from runtime.seeding import Stream, derive_seed

__all__ = ["DeviceAugment", "ViewParams", "sample_params"]


def _recipe_key(view: ViewConfig) -> tuple:
    """Views with equal keys share one stacked call (role and count do not affect the pixels)."""
    return dataclasses.astuple(dataclasses.replace(view, role="global", count=1))


def _jitter_enabled(view: ViewConfig) -> backends.Enabled:
    return (view.brightness > 0, view.contrast > 0, view.saturation > 0, view.hue > 0)


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
        impl: which implementations run the stages (``DataConfig.augment``); None = the defaults.
    """

    def __init__(self, views: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float],
                 out_dtype: torch.dtype = torch.float32, channels_last: bool = False, seed: int = 0,
                 compile: bool = False, flip: bool = False, impl: AugmentConfig | None = None):
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
        self.impl = impl or AugmentConfig()
        self.compiled = compile
        self.graphs = backends.Graphs() if compile else None  # one compile per (view size, stack size, optional ops)

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
        color = f"color_{self.impl.jitter_impl}"
        flip = backends.selected(p.flip) if self.flip else None
        with record_function(f"augment/{color}"):  # profiler ranges, ~free when not profiling
            y = self._stage(color, x)(x, flip, p, _jitter_enabled(view), self.graphs)
        if bool(p.blur.any()):
            size = blur_kernel_size(view.blur_sigma[1], view.blur_kernel)
            with record_function("augment/blur"):
                y = self._stage("blur", y)(y, p.blur, p.sigma, size)
        scale, bias = self._norm_consts(x.device)
        with record_function("augment/finish"):
            return self._stage("finish", y)(y, backends.selected(p.solarize), scale, bias, self.out_dtype,
                                            self.channels_last, self.graphs)

    def _stage(self, stage: str, x: torch.Tensor):
        """The implementation of ``stage`` for input ``x`` (:func:`pipeline.augment.backends.resolve`)."""
        return backends.resolve(stage, x, self.impl.cpu_impl, self.compiled)


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
