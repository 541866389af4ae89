"""MV-MR's hand-crafted representations of the non-augmented view, batched on the input's device.

Reference: vkinakh/mv-mr @ 7136f70 ``src/model/self_supervised_module.py::_step_dc`` (+ ``src/model/hog.py``,
``src/utils/utils.py::std_filter_torch``); notes ``docs/methods/mvmr.md`` ("Loss"). All five take the *normalised* image
batch ``x_o`` (B, 3, H, W) and return a float32 tensor with leading dimension B, without gradient:

==================== ========================================================== ==================== ==============
name                 computation                                                output               official scale
==================== ========================================================== ==================== ==============
``full_img``         the image itself                                           (B, 3, H, W)         1/32
``full_img_scatnet`` kymatio ``Scattering2D(J=2, L=8)``                         (B, 3, 81, H/4, W/4) 1/32
``full_img_augment`` one random torchvision transform for the whole batch       (B, 3, H, W)         1/32
``full_img_hog``     HOG per colour channel, 24 bins, 8x8 average pooling       (B, 72, H/8, W/8)    1
``full_img_std``     3x3 local standard deviation (reflect border)              (B, 3, H, W)         1
==================== ========================================================== ==================== ==============

The scale is the official code's fp16 "trick"; it only matters through the dCor clamp (see ``losses/mvmr.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from runtime.seeding import Stream, derive_seed

#: representation name -> the factor the official code divides it by before dCor
CODE_SCALE: dict[str, float] = {
    "full_img": 32.0,
    "full_img_scatnet": 32.0,
    "full_img_augment": 32.0,
    "full_img_hog": 1.0,
    "full_img_std": 1.0,
}


# ---------------------------------------------------------------------------------------------- HOG
def hog_features(x: torch.Tensor, nbins: int = 24, pool: int = 8) -> torch.Tensor:
    """Per-channel oriented-gradient histograms, as the official ``HOGLayer``.

    Sobel cross-correlation (zero padding) ``g0 = [[1,0,-1],[2,0,-2],[1,0,-1]] * x``, ``g1`` with the transposed
    kernel; magnitude ``m = |g|``; bin position ``phi = atan2(g0, g1) / pi * nbins``. The histogram gets ``m`` at
    ``floor(phi) mod nbins`` (assignment) and then ``1 - m`` added at ``ceil(phi) mod nbins`` -- the original code's
    weighting, kept on purpose (a flat pixel puts 1 into bin 0). Finally ``pool x pool`` average pooling.

    Args:
        x: (B, C, H, W) images.
        nbins: orientation bins over (-pi, pi].
        pool: side of the average-pooling cells (stride = side).
    Returns:
        (B, C * nbins, H // pool, W // pool), colour-major (channel ``c * nbins + k``), float32.
    """
    b, c, h, w = x.shape
    planes = x.float().reshape(b * c, 1, h, w)
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device)
    weight = torch.stack([k, k.T])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(planes, weight, padding=1)  # (BC, 2, H, W)
    mag = g.norm(dim=1, keepdim=True)
    phi = torch.atan2(g[:, 0:1], g[:, 1:2]) / math.pi * nbins
    hist = torch.zeros(b * c, nbins, h, w, device=x.device)
    hist.scatter_(1, phi.floor().long() % nbins, mag)
    hist.scatter_add_(1, phi.ceil().long() % nbins, 1.0 - mag)
    hist = F.avg_pool2d(hist, pool, stride=pool)
    return hist.reshape(b, c * nbins, h // pool, w // pool)


# ---------------------------------------------------------------------------------------------- local std
def local_std(x: torch.Tensor, kernel: int = 3, eps: float = 1e-8) -> torch.Tensor:
    """``sqrt(box(x^2) - box(x)^2 + eps)`` with a normalised ``kernel x kernel`` box filter, reflect border; NaN -> 0.

    (B, C, H, W) -> (B, C, H, W) float32. Equals the official ``std_filter_torch`` (kornia ``box_blur``).
    """
    x = x.float()
    p = kernel // 2
    pad = (p, kernel - 1 - p, p, kernel - 1 - p)

    def box(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(t, pad, mode="reflect"), kernel, stride=1)

    sigma = torch.sqrt(box(x * x) - box(x) ** 2 + eps)
    return torch.where(torch.isnan(sigma), torch.zeros_like(sigma), sigma)


# ---------------------------------------------------------------------------------------------- batch augmentation
def finite_adjust_hue(x: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision ``adjust_hue`` with its 0 * inf singularity resolved to its limit.

    On *normalised* images (negative values) a pixel whose largest channel is exactly 0 while another is negative
    gets saturation ``(max - min) / max = inf`` and comes out NaN; with bf16 views and bilinear crops such pixels do
    occur (about one step in twenty in the demo), and the NaN then spreads over the image (contrast uses its mean) and
    into the loss. The official run used fp16 AMP, whose GradScaler silently skips such a step. The value there is
    ``v * (...)`` with ``v = max = 0``, i.e. 0 for every finite saturation, so NaN -> 0 is the continuous extension.
    """
    out = TF.adjust_hue(x, hue_factor)
    return torch.where(torch.isnan(out), torch.zeros_like(out), out)


class BatchColorJitter(T.ColorJitter):
    """``T.ColorJitter`` (same parameter draws, same random order, same ops) with :func:`finite_adjust_hue`."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        order, *factors = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, finite_adjust_hue)
        for i in order.tolist():
            if factors[i] is not None:
                img = ops[i](img, factors[i])
        return img


def batch_augment_transform(size: int) -> T.Compose:
    """The official ``full_img_augment`` transform: torchvision v1 ops on a 4-D tensor, so every random parameter is
    drawn once for the whole batch. Applied to the *normalised* image (ColorJitter clamps float images to [0, 1]).

    RandomResizedCrop(size, scale 0.08-1, bilinear) -> flip 0.5 -> ColorJitter(0.8, 0.8, 0.8, 0.2) p0.8 ->
    grayscale p0.2 -> GaussianBlur(kernel 2*int(0.05*size)+1, sigma U(0.1, 2)) always. The only change to the
    official transform is :class:`BatchColorJitter` (hue NaN -> 0, see :func:`finite_adjust_hue`).
    """
    blur = 2 * int(0.05 * size) + 1
    return T.Compose([
        # torchvision 0.13 (official) did not antialias tensors; the crop is only ever upsampled here anyway
        T.RandomResizedCrop(size, antialias=False),
        T.RandomHorizontalFlip(),
        T.RandomApply([BatchColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.GaussianBlur(kernel_size=blur),
    ])


# ---------------------------------------------------------------------------------------------- the module
class HandcraftedRepresentations(nn.Module):
    """Computes the selected representations of the non-augmented view (no parameters, no state).

    The kymatio scattering operators hold shape-dependent filter buffers; they are cached per (H, W, device) outside
    the module tree so that checkpoints do not depend on the image size.

    Args:
        names: which of :data:`CODE_SCALE` to compute, in order.
        scat_j, scat_l: scattering scales J and orientations L (official 2 and 8 -> 81 channels per colour).
        hog_bins, hog_pool: HOG orientation bins and pooling cell (official 24 and 8).
        std_kernel: side of the local-std box filter (official 3).
        seed: base seed of the batch augmentation; the draw at a step depends only on ``(seed, step)``. The official
            code seeds the global RNG identically on every rank, so all ranks draw the same parameters; so do we.
    """

    def __init__(self, names: Sequence[str], scat_j: int = 2, scat_l: int = 8, hog_bins: int = 24, hog_pool: int = 8,
                 std_kernel: int = 3, seed: int = 0):
        super().__init__()
        unknown = [n for n in names if n not in CODE_SCALE]
        if unknown:
            raise ValueError(f"unknown representation {unknown[0]!r}; allowed values: {', '.join(CODE_SCALE)}")
        self.names = list(names)
        self.scat_j, self.scat_l = scat_j, scat_l
        self.hog_bins, self.hog_pool, self.std_kernel = hog_bins, hog_pool, std_kernel
        self.seed = seed
        self._scattering: dict[tuple, nn.Module] = {}
        self._augment: dict[int, T.Compose] = {}
        self._fns: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
            "full_img": lambda x, step: x,
            "full_img_scatnet": lambda x, step: self.scatter(x),
            "full_img_augment": self.augment,
            "full_img_hog": lambda x, step: hog_features(x, self.hog_bins, self.hog_pool),
            "full_img_std": lambda x, step: local_std(x, self.std_kernel),
        }

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """kymatio 2-D scattering. (B, C, H, W) -> (B, C, 1 + J L + L^2 J (J-1) / 2, H / 2^J, W / 2^J)."""
        key = (x.shape[-2], x.shape[-1], str(x.device))
        if key not in self._scattering:
            # the 2-D frontend module directly: ``kymatio.torch`` also imports the 3-D frontend, which needs
            # scipy.special.sph_harm (removed in scipy 1.17)
            from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

            self._scattering[key] = ScatteringTorch2D(J=self.scat_j, shape=key[:2], L=self.scat_l).to(x.device)
        return self._scattering[key](x.contiguous())

    def augment(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """One batch-shared draw of :func:`batch_augment_transform`, reproducible from ``(seed, step)``.

        torchvision draws its parameters from the CPU default generator; it is forked so the caller's RNG stream is
        untouched, and reseeded from the step. (B, 3, H, W) -> (B, 3, H, H).
        """
        size = x.shape[-2]
        if size not in self._augment:
            self._augment[size] = batch_augment_transform(size)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(Stream.HANDCRAFTED_AUGMENT, self.seed, step))
            return self._augment[size](x.contiguous())

    @torch.no_grad()
    def forward(self, x: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Args: x — (B, 3, H, W) normalised original view; step — global step (seeds the augmentation).
        Returns: name -> float32 tensor (B, ...) for every selected representation."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"hand-crafted representations need (B, 3, H, W) images, got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 regardless of the caller's autocast
            x = x.detach().float()
            return {name: self._fns[name](x, step).float() for name in self.names}
