"""RandomResizedCrop parameter sampling (torchvision semantics) and the uint8 crop+resize kernel.

The sampler follows ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 attempts with an area fraction
``~ U(scale)`` and a log-uniform aspect ratio ``w / h ~ exp(U(log ratio))``; an attempt is accepted when the rounded
box fits the image, and the box position is uniform over all valid positions. If no attempt fits, the fallback is a
centred crop of the whole image clamped to the allowed ratio range. The aspect-ratio jitter is kept on purpose: one
FFCV-SSL fork computes ``h`` with ``* ratio`` instead of ``/ ratio`` and therefore only ever cuts square boxes (the
tests check that ours are not square).

Three entry points share the algorithm:

* :func:`sample_rrc` - one box, plain ``math`` + a ``numpy.random.Generator``; it is numba-compatible, and
  :data:`sample_rrc_nb` is its ``@njit`` twin (``None`` when numba is not importable) for FFCV-style decoders.
* :func:`sample_rrc_batch` - N boxes at once, vectorised numpy (for loaders that sample a whole batch up front).
* :func:`crop_resize_uint8` - cut one box out of an HWC uint8 image and resize it (OpenCV, PIL fallback).

Random streams differ from torchvision's (numpy vs torch RNG), so parity is distributional, not bitwise.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

try:  # OpenCV is the fast path; PIL is the fallback (and the DINO reference kernel).
    import cv2  # loaders with many workers should call cv2.setNumThreads(1) in each worker (not done here: global)
except ImportError:  # pragma: no cover - exercised only on machines without OpenCV
    cv2 = None

N_ATTEMPTS = 10  # torchvision's number of rejection-sampling attempts before the centre-crop fallback

Interpolation = Literal["auto", "bicubic", "bilinear", "area", "pil_bicubic"]


def _fallback_box(height: int, width: int, ratio_min: float, ratio_max: float) -> tuple[int, int, int, int]:
    """Centre crop of the whole image clamped to ``[ratio_min, ratio_max]`` (torchvision's fallback)."""
    in_ratio = width / height
    if in_ratio < ratio_min:
        w = width
        h = int(round(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = int(round(h * ratio_max))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_rrc(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Sample one RandomResizedCrop box with torchvision's algorithm.

    Numba-compatible (plain ``math`` and ``rng.uniform`` / ``rng.integers``); see :data:`sample_rrc_nb`.

    Args:
        height: source image height in pixels (> 0).
        width: source image width in pixels (> 0).
        scale: (min, max) fraction of the source area covered by the crop.
        ratio: (min, max) aspect ratio ``w / h`` of the crop, sampled log-uniformly.
        rng: numpy Generator (consumed: 2 uniforms per attempt, 2 integers on success).

    Returns:
        ``(top, left, crop_h, crop_w)``, with ``0 <= top``, ``top + crop_h <= height`` and likewise for width.
    """
    area = height * width
    log_lo = math.log(ratio[0])
    log_hi = math.log(ratio[1])
    for _ in range(N_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return _fallback_box(height, width, ratio[0], ratio[1])


def _njit_twin():
    """``@njit`` copy of :func:`sample_rrc` whose ``_fallback_box`` global resolves to a jitted helper."""
    import types

    import numba

    globals_nb = dict(globals(), _fallback_box=numba.njit(cache=False)(_fallback_box))
    clone = types.FunctionType(sample_rrc.__code__, globals_nb, "sample_rrc_nb")
    return numba.njit(cache=False)(clone)


try:
    #: ``@njit`` twin of :func:`sample_rrc` (same arguments, float tuples for scale/ratio); None without numba.
    #: Compiled lazily on first call (~1 s).
    sample_rrc_nb = _njit_twin()
except ImportError:  # pragma: no cover
    sample_rrc_nb = None


def sample_rrc_batch(
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Vectorised :func:`sample_rrc` for N images (all 10 attempts drawn up front, first fitting one kept).

    Args:
        heights: (N,) source heights.
        widths: (N,) source widths.
        scale: (min, max) area fraction.
        ratio: (min, max) aspect ratio ``w / h``.
        rng: numpy Generator.

    Returns:
        (N, 4) int64 array of ``(top, left, crop_h, crop_w)``.
    """
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if heights.shape != widths.shape:
        raise ValueError(f"sample_rrc_batch: heights {heights.shape} and widths {widths.shape} differ in shape")
    n = heights.shape[0]
    area = (heights * widths).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], size=(n, N_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, N_ATTEMPTS)))
    # np.round is round-half-to-even like Python's round(), so this matches the scalar path exactly.
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = ok.argmax(axis=1)
    found = ok[np.arange(n), first]
    out = np.empty((n, 4), dtype=np.int64)
    h_sel = h[np.arange(n), first]
    w_sel = w[np.arange(n), first]
    u_top = rng.random(n)
    u_left = rng.random(n)
    # Uniform integer in [0, H - h] from a uniform float; min() guards the u -> 1 edge.
    out[:, 0] = np.minimum((u_top * (heights - h_sel + 1)).astype(np.int64), heights - h_sel)
    out[:, 1] = np.minimum((u_left * (widths - w_sel + 1)).astype(np.int64), widths - w_sel)
    out[:, 2] = h_sel
    out[:, 3] = w_sel
    for i in np.flatnonzero(~found):  # rare: only for extreme aspect ratios
        out[i] = _fallback_box(int(heights[i]), int(widths[i]), ratio[0], ratio[1])
    return out


def _cv2_flag(interpolation: str, downscale: bool) -> int:
    if interpolation == "auto":
        return cv2.INTER_AREA if downscale else cv2.INTER_CUBIC
    return {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}[interpolation]


def crop_resize_uint8(
    img: np.ndarray,
    box: tuple[int, int, int, int],
    out_size: int | tuple[int, int],
    interpolation: Interpolation = "auto",
) -> np.ndarray:
    """Cut ``box`` out of an HWC uint8 RGB image and resize it.

    Kernels: ``"auto"`` (default) uses OpenCV ``INTER_AREA`` when shrinking (pixel-area averaging, i.e. antialiased -
    OpenCV's ``INTER_CUBIC`` does not antialias and aliases badly at the 4-10x shrink factors of local crops) and
    ``INTER_CUBIC`` when enlarging (same Keys a=-0.75 cubic family as PIL's bicubic upsampling). ``"bicubic"``,
    ``"bilinear"``, ``"area"`` force one OpenCV kernel. ``"pil_bicubic"`` uses PIL's antialiased bicubic - the
    kernel of the DINO/torchvision reference recipe - and is also the fallback when OpenCV is missing.

    Args:
        img: (H, W, 3) uint8, C-contiguous or not.
        box: ``(top, left, crop_h, crop_w)`` inside the image.
        out_size: output side, or ``(out_h, out_w)``.
        interpolation: kernel choice, see above.

    Returns:
        (out_h, out_w, 3) uint8 array.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"crop_resize_uint8: expected (H, W, 3) uint8, got {img.shape} {img.dtype}")
    top, left, ch, cw = (int(v) for v in box)
    if not (0 <= top and 0 <= left and ch > 0 and cw > 0 and top + ch <= img.shape[0] and left + cw <= img.shape[1]):
        raise ValueError(f"crop_resize_uint8: box {box} outside image of shape {img.shape}")
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    crop = img[top : top + ch, left : left + cw]
    if interpolation == "pil_bicubic" or cv2 is None:
        from PIL import Image

        pil = Image.fromarray(np.ascontiguousarray(crop))
        return np.asarray(pil.resize((out_w, out_h), Image.BICUBIC))
    if (ch, cw) == (out_h, out_w):
        return np.ascontiguousarray(crop)
    downscale = ch * cw > out_h * out_w
    return cv2.resize(crop, (out_w, out_h), interpolation=_cv2_flag(interpolation, downscale))
