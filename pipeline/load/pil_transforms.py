"""The reference per-image recipe, built the way the official repositories build it (PIL + torchvision v1).

One transform per view (``DataConfig.expanded_views()``), in the DINO/BYOL order::

    RandomResizedCrop(size, scale, ratio, bicubic) -> RandomHorizontalFlip(flip_p)
    -> RandomApply(ColorJitter(b, c, s, h), jitter_p) -> RandomGrayscale(grayscale_p)
    -> PIL GaussianBlur(radius ~ U(blur_sigma)) with prob blur_p -> PIL solarize(128) with prob solarize_p
    -> ToTensor -> Normalize(mean, std)

``crop_only=True`` keeps only crop + flip and returns uint8 CHW tensors: the fast path of the baseline loader, where
:class:`pipeline.augment.gpu_augment.DeviceAugment` does the rest batched on the device.

Randomness comes from torch's global RNG (``torch.rand``), which the loader reseeds per sample, so results do not
depend on the number of workers. Blur/solarize follow DINO's ``GaussianBlur``/``Solarization`` semantics (PIL
``ImageFilter.GaussianBlur(radius=sigma)``, whose radius is the Gaussian's standard deviation, and
``ImageOps.solarize(threshold=128)``, which inverts pixels >= 128). A view with ``blur_kernel > 0`` uses
torchvision's ``GaussianBlur(blur_kernel, blur_sigma)`` instead, as the SimCLR-style repositories do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from pipeline.config import ViewConfig

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _mode(interpolation: str) -> InterpolationMode:
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"data.interpolation: {interpolation!r} is not one of {sorted(_INTERPOLATION)}")
    return _INTERPOLATION[interpolation]


class RandomGaussianBlurPIL:
    """With probability ``p``, blur with PIL's Gaussian of standard deviation ``sigma ~ U(sigma_min, sigma_max)``."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.sigma
        radius = lo + (hi - lo) * float(torch.rand(()))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


class RandomSolarizePIL:
    """With probability ``p``, invert every pixel value >= ``threshold`` (PIL ``ImageOps.solarize``)."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return img
        return ImageOps.solarize(img, threshold=self.threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


def build_pil_view_transform(
    view: ViewConfig,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    interpolation: str = "bicubic",
    crop_only: bool = False,
) -> T.Compose:
    """One view's per-image transform: PIL RGB image -> tensor (3, size, size).

    Args:
        view: the view's recipe (``count`` is ignored: one transform produces one crop).
        mean: normalisation mean (RGB, [0, 1] scale).
        std: normalisation std.
        interpolation: resize kernel of RandomResizedCrop, ``"bicubic"`` (DINO) or ``"bilinear"``.
        crop_only: only crop + flip, returning uint8 (3, size, size) (colour ops then run on the device).

    Returns:
        A ``torchvision.transforms.Compose``; float32 normalised output, or uint8 if ``crop_only``.
    """
    ops: list = [
        T.RandomResizedCrop(view.size, scale=tuple(view.scale), ratio=tuple(view.ratio),
                            interpolation=_mode(interpolation)),
        T.RandomHorizontalFlip(p=view.flip_p),
    ]
    if crop_only:
        return T.Compose(ops + [T.PILToTensor()])
    strengths = (view.brightness, view.contrast, view.saturation, view.hue)
    if view.jitter_p > 0 and any(s > 0 for s in strengths):
        ops.append(T.RandomApply([T.ColorJitter(*strengths)], p=view.jitter_p))
    if view.grayscale_p > 0:
        ops.append(T.RandomGrayscale(p=view.grayscale_p))
    if view.blur_p > 0 and view.blur_kernel > 0:  # torchvision's fixed-size kernel (SimCLR / MV-MR style)
        ops.append(T.RandomApply([T.GaussianBlur(view.blur_kernel, tuple(view.blur_sigma))], p=view.blur_p))
    elif view.blur_p > 0:  # DINO style: PIL's Gaussian, support follows sigma
        ops.append(RandomGaussianBlurPIL(view.blur_p, tuple(view.blur_sigma)))
    if view.solarize_p > 0:
        ops.append(RandomSolarizePIL(view.solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


