"""Fixtures for the converter tests: tiny ImageFolder trees (good and bad inputs) generated in ``tmp_path``."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 smooth random colours (low-frequency content, so JPEG errors stay small)."""
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def save(path: Path, arr_or_img: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, format=fmt, **kw)
    return path


@dataclass
class Tree:
    """A generated split: ``root`` and, per relative path, the expected outcome.

    ``expect[path]`` is ``"ok"`` (converted) or a substring of the skip reason. ``reference[path]`` is the RGB image
    (H, W, 3) uint8 the stored pixels should match before resizing (for converted entries that have one).
    """

    root: Path
    expect: dict[str, str]
    reference: dict[str, np.ndarray]


@pytest.fixture
def good_tree(tmp_path: Path) -> Tree:
    """3 classes x 4 smooth JPEGs (q95, optimized Huffman tables) of mixed sizes, some larger than a 64 px max side."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src" / "train"
    expect, ref = {}, {}
    sizes = [(48, 40), (90, 60), (50, 120), (64, 64)]
    for c in ("apple", "banana", "cherry"):
        for i, (h, w) in enumerate(sizes):
            arr = smooth_image(rng, h, w)
            rel = f"{c}/img{i}.JPEG"
            save(root / rel, arr, quality=95, optimize=True)
            expect[rel], ref[rel] = "ok", np.asarray(Image.open(root / rel).convert("RGB"))
    return Tree(root, expect, ref)


def _cmyk_jpeg(path: Path, arr: np.ndarray) -> None:
    save(path, Image.fromarray(arr).convert("CMYK"), quality=95)


def _bad_files(root: Path, rng: np.random.Generator) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    expect, ref = {}, {}
    base = smooth_image(rng, 40, 48)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=95)
    good = buf.getvalue()
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a/ok.jpg").write_bytes(good)
    expect["a/ok.jpg"], ref["a/ok.jpg"] = "ok", np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))
    (root / "a/truncated.jpg").write_bytes(good[: len(good) // 2])
    expect["a/truncated.jpg"] = "truncated"
    (root / "a/garbage.jpg").write_bytes(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    expect["a/garbage.jpg"] = "not a readable image"
    (root / "a/text_named.png").write_text("this is not a png\n")
    expect["a/text_named.png"] = "not a readable image"
    (root / "a/notes.txt").write_text("hello\n")
    expect["a/notes.txt"] = "not an image file extension"
    (root / "a/zero.jpg").write_bytes(b"")
    expect["a/zero.jpg"] = "empty file"
    (root / "a/.DS_Store").write_bytes(b"\0\0")
    expect["a/.DS_Store"] = "hidden file"
    (root / "a/dangling.jpg").symlink_to(root / "does_not_exist.jpg")
    expect["a/dangling.jpg"] = "unreadable"
    (root / "b/same_as_ok.jpg").symlink_to(root / "a/ok.jpg")
    expect["b/same_as_ok.jpg"] = "duplicate entry"
    (root / "loose.jpg").write_bytes(good)
    expect["loose.jpg"] = "not inside a class folder"
    (root / "empty_class").mkdir()
    expect["empty_class"] = "empty class folder"
    return expect, ref


def _colour_variants(root: Path, rng: np.random.Generator) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    expect, ref = {}, {}
    arr = smooth_image(rng, 40, 48)
    _cmyk_jpeg(root / "b/cmyk.jpg", arr)
    ref["b/cmyk.jpg"] = arr
    gray = arr.mean(axis=2).astype(np.uint8)
    save(root / "b/gray.jpg", gray, quality=95)
    ref["b/gray.jpg"] = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([arr, rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=2)
    save(root / "b/rgba.png", rgba, fmt="PNG")
    ref["b/rgba.png"] = arr
    save(root / "b/palette.png", Image.fromarray(arr).quantize(256, dither=Image.Dither.NONE), fmt="PNG")
    ref["b/palette.png"] = np.asarray(Image.open(root / "b/palette.png").convert("RGB"))
    save(root / "b/lossless.webp", arr, fmt="WEBP", lossless=True)
    ref["b/lossless.webp"] = arr
    g16 = (arr[:, :, 0].astype(np.uint16) * 257 + rng.integers(0, 257, (40, 48))).astype(np.uint16)
    save(root / "b/gray16.png", Image.fromarray(g16), fmt="PNG")
    ref["b/gray16.png"] = np.repeat(np.round(g16 / 257.0).astype(np.uint8)[:, :, None], 3, axis=2)
    save(root / "b/progressive.jpg", arr, quality=95, progressive=True)
    ref["b/progressive.jpg"] = np.asarray(Image.open(root / "b/progressive.jpg").convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    save(root / "b/rotated.jpg", arr, quality=95, exif=exif.tobytes())
    ref["b/rotated.jpg"] = np.rot90(np.asarray(Image.open(root / "b/rotated.jpg").convert("RGB")), k=-1)
    expect.update(dict.fromkeys(ref, "ok"))
    return expect, ref


def _rgb16_png(path: Path, rgb16: np.ndarray) -> None:
    """Write a 16-bit RGB PNG (Pillow cannot write one; OpenCV can, it expects BGR order)."""
    import cv2

    cv2.imwrite(str(path), np.ascontiguousarray(rgb16[:, :, ::-1]))


@pytest.fixture
def bad_tree(tmp_path: Path) -> Tree:
    """One split with every kind of bad input next to a few good ones (see ``Tree.expect``)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "src" / "train"
    expect, ref = _bad_files(root, rng)
    e2, r2 = _colour_variants(root, rng)
    expect.update(e2)
    ref.update(r2)
    rgb16 = (smooth_image(rng, 40, 48).astype(np.uint16) * 257 + rng.integers(0, 257, (40, 48, 3))).astype(np.uint16)
    _rgb16_png(root / "b/rgb16.png", rgb16)
    expect["b/rgb16.png"], ref["b/rgb16.png"] = "ok", np.round(rgb16 / 257.0).astype(np.uint8)
    return Tree(root, expect, ref)
