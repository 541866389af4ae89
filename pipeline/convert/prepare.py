"""[0] Image preparation for ``convert_dataset.py``: one source file -> the stored bytes (no FFCV/DALI imports).

:func:`prepare_image` turns one file into a **baseline 3-channel JPEG** (what every decoder used here handles,
nvJPEG's hardware engine included). CMYK, grayscale, palette and alpha images become RGB as torchvision's
``pil_loader`` does (so pixels match the baseline); 16-bit images ``round(x / 257)``; float images in [0, 1]
``round(255 x)``; EXIF orientation is applied unless disabled.

Resizing only shrinks, by ``min(1, max_side / long_side, short_side / short_side_px)`` (0 disables a limit), with
Pillow's antialiased bicubic (the torchvision reference kernel); JPEGs shrinking by >= 2x are first DCT-decoded at a
scale that keeps >= 2x oversampling. Encoding: libjpeg-turbo at ``jpeg_quality``, 4:2:0, optimized Huffman tables.
With ``reencode='auto'`` a baseline YCbCr JPEG that needs no resize or rotation is stored byte for byte unless
re-encoding makes it more than 10 % smaller (no generation loss for low-quality sources; high-quality ones shrink).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# reencode="auto" keeps a fitting source JPEG unless re-encoding at jpeg_quality makes it >10% smaller.
KEEP_ORIGINAL_RATIO = 1.1
MAX_PIXELS = 150_000_000  # refuse larger images (~450 MB as RGB per worker); Pillow refuses > 179 MP itself


@dataclass(frozen=True)
class PrepareParams:
    """How :func:`prepare_image` stores an image (see the module docstring)."""

    max_side: int = 512
    short_side: int = 0
    jpeg_quality: int = 90
    reencode: str = "auto"  # "auto" | "always"
    exif_transpose: bool = True


@dataclass(frozen=True)
class Prepared:
    """A stored-ready image: JPEG bytes and the decoded size; ``reencoded`` is False for byte-for-byte copies."""

    jpeg: bytes
    height: int
    width: int
    reencoded: bool


def _high_depth_to_uint8(im: Image.Image) -> np.ndarray:
    """(H, W) uint8 from Pillow's 16/32-bit integer and float modes; raises ValueError when the range is unknown."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    if im.mode == "I":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit integer image with values in [{lo}, {hi}] (expected 0..65535)")
        return a.astype(np.uint8) if hi <= 255 else np.round(a / 257.0).astype(np.uint8)
    a = a.astype(np.float64)  # mode "F"
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError("float image with values outside [0, 1]")
    return np.round(a * 255.0).astype(np.uint8)


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode (see the module docstring for the conversions)."""
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode.startswith("I") or im.mode == "F":
        g = _high_depth_to_uint8(im)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _scale_factor(width: int, height: int, p: PrepareParams) -> float:
    f = 1.0
    if p.max_side > 0:
        f = min(f, p.max_side / max(width, height))
    if p.short_side > 0:
        f = min(f, p.short_side / min(width, height))
    return f


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF: treat as not rotated
        return 1


def _encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=True)
    return buf.getvalue()


def prepare_image(data: bytes, params: PrepareParams) -> Prepared:
    """Decode, colour-convert, shrink and (re-)encode one image (see the module docstring).

    Args:
        data: the source file's bytes.
        params: storage settings.

    Returns:
        :class:`Prepared` with baseline 3-channel JPEG bytes and the stored (height, width).

    Raises:
        ValueError: the image cannot be stored (the message is the user-facing skip reason).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency and similar notices; failures still raise
        try:
            with Image.open(io.BytesIO(data)) as im:
                return _prepare_opened(im, data, params)
        except UnidentifiedImageError:
            raise ValueError("not a readable image (unknown or corrupt format)") from None
        except Image.DecompressionBombError as e:
            raise ValueError(f"image too large ({e})") from None
        except (OSError, SyntaxError, EOFError) as e:
            msg = str(e) or type(e).__name__
            kind = "truncated image" if "truncated" in msg else "corrupt image"
            raise ValueError(f"{kind}: {msg}") from None


def _prepare_opened(im: Image.Image, data: bytes, p: PrepareParams) -> Prepared:
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"image too large ({width}x{height} > {MAX_PIXELS} pixels)")
    fmt, mode = im.format, im.mode
    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    orientation = _orientation(im)
    rotate = p.exif_transpose and orientation != 1
    f = _scale_factor(width, height, p)
    if fmt == "JPEG" and f <= 0.5:
        # DCT-domain downscale at decode time; draft keeps >= the requested size, i.e. >= 2x the target.
        im.draft(None, (max(1, math.ceil(2 * width * f)), max(1, math.ceil(2 * height * f))))
    im.load()  # raises on truncated/corrupt data
    keep_candidate = (
        p.reencode == "auto" and fmt == "JPEG" and mode == "RGB" and not progressive and not rotate and f == 1.0
    )
    if rotate:
        im = ImageOps.exif_transpose(im)
    arr = to_rgb_array(im)
    # Target size from the full-resolution size (draft may already have shrunk the decoded image).
    target = (max(1, round(width * f)), max(1, round(height * f)))
    if orientation in (5, 6, 7, 8) and rotate:
        target = target[::-1]  # EXIF rotation by 90/270 degrees swaps the axes
    if f < 1.0 and arr.shape[:2] != (target[1], target[0]):
        arr = np.asarray(Image.fromarray(arr).resize(target, Image.Resampling.BICUBIC))
    jpeg = _encode_jpeg(np.ascontiguousarray(arr), p.jpeg_quality)
    if keep_candidate and len(data) <= KEEP_ORIGINAL_RATIO * len(jpeg):
        return Prepared(data, height, width, reencoded=False)  # re-encoding would barely save bytes: no loss instead
    return Prepared(jpeg, arr.shape[0], arr.shape[1], True)


def read_and_prepare(path: str, params: PrepareParams) -> Prepared | str:
    """Read ``path`` and :func:`prepare_image` it; returns the skip reason (str) instead of raising."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    try:
        return prepare_image(data, params)
    except ValueError as e:
        return str(e)
    except MemoryError:
        return "out of memory while decoding"
