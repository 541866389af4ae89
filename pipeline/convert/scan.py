"""[0] ImageFolder scanning, validation and image preparation for ``convert_dataset.py``.

Both stages are free of FFCV/DALI imports, so they run in plain worker processes:

* :func:`scan_image_folder` lists ``<src>/<class>/**/<file>`` (or a file list), assigns labels from ``class_to_idx``
  (sorted class folders unless given), and returns the candidates plus every input it rejected up front (non-image
  extension, hidden, outside a class folder, duplicate, unreadable, empty class), each with a reason, and a
  fingerprint of the listing (path, size, mtime) that tells a converter whether an output is up to date.
* :func:`prepare_image` turns one file into the stored bytes: a **baseline 3-channel JPEG** (what every decoder used
  here handles, nvJPEG's hardware engine included). CMYK, grayscale, palette and alpha images become RGB as
  torchvision's ``pil_loader`` does (so pixels match the baseline); 16-bit images ``round(x / 257)``; float images in
  [0, 1] ``round(255 x)``; EXIF orientation is applied unless disabled.

Resizing only shrinks, by ``min(1, max_side / long_side, short_side / short_side_px)`` (0 disables a limit), with
Pillow's antialiased bicubic (the torchvision reference kernel); JPEGs shrinking by >= 2x are first DCT-decoded at a
scale that keeps >= 2x oversampling. Encoding: libjpeg-turbo at ``jpeg_quality``, 4:2:0, optimized Huffman tables.
With ``reencode='auto'`` a baseline YCbCr JPEG that needs no resize or rotation is stored byte for byte unless
re-encoding makes it more than 10 % smaller (no generation loss for low-quality sources; high-quality ones shrink).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.convert.scan_checks import (
    link_problem,
    load_class_index,
    missing_classes_warning,
    name_problem,
    printable,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# reencode="auto" keeps a fitting source JPEG unless re-encoding at jpeg_quality makes it >10% smaller.
KEEP_ORIGINAL_RATIO = 1.1
MAX_PIXELS = 150_000_000  # refuse larger images (~450 MB as RGB per worker); Pillow refuses > 179 MP itself


class ConvertError(Exception):
    """A user-facing conversion error (bad arguments, missing/empty input, --strict failures); no traceback."""


@dataclass(frozen=True)
class SourceItem:
    """One candidate image: ``path`` relative to the source root (POSIX separators) and its class index."""

    path: str
    label: int


@dataclass(frozen=True)
class Skip:
    """A rejected input and why (``path`` relative to the source root, or the root itself)."""

    path: str
    reason: str


@dataclass
class Listing:
    """Result of :func:`scan_image_folder`."""

    root: str
    items: list[SourceItem]
    class_to_idx: dict[str, int]
    skipped: list[Skip] = field(default_factory=list)
    fingerprint: str = ""
    warnings: list[str] = field(default_factory=list)  # problems that do not skip an input (printed by convert)


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


# ------------------------------------------------------------------------------------------------ listing


def _load_class_index(path: str) -> dict[str, int]:
    try:
        return load_class_index(path)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _walk_class_dir(root: str, cls: str, skipped: list[Skip], follow_links: bool) -> list[str]:
    """All files under ``root/cls`` (recursive, sorted), relative to ``root``. Directory symlinks are followed only
    when :func:`scan_checks.link_problem` allows it, and each real folder is scanned once (no loops)."""
    out, root_real = [], os.path.realpath(root)
    class_real = os.path.realpath(os.path.join(root, cls))
    visited = {class_real}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        keep = []
        for d in sorted(dirnames):
            rel, full = f"{rel_dir}/{d}", os.path.join(dirpath, d)
            real = os.path.realpath(full)
            problem = ("hidden folder (not scanned)" if d.startswith(".") else
                       link_problem(full, root_real, class_real, follow_links) or
                       (f"symlink to a folder scanned already ({real}); not followed" if real in visited else None))
            if problem:
                skipped.append(Skip(printable(rel), problem))
            else:
                visited.add(real)
                keep.append(d)
        dirnames[:] = keep
        out.extend(f"{rel_dir}/{name}" for name in sorted(filenames))
    return out


def _read_file_list(root: str, file_list: str) -> list[str]:
    try:
        with open(file_list) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConvertError(f"--file-list {file_list}: cannot read ({e.strerror})") from None
    entries = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if os.path.isabs(line):
            line = os.path.relpath(line, root)
        entries.append(os.path.normpath(line).replace(os.sep, "/"))
    return entries


def _listing_entries(root: str, file_list: str | None,
                     follow_links: bool) -> tuple[list[str], list[str], list[Skip]]:
    """(class names found, relative file entries, up-front skips) for a folder walk or a file list."""
    skipped: list[Skip] = []
    if file_list is not None:
        entries = _read_file_list(root, file_list)
        classes = sorted({e.split("/", 1)[0] for e in entries if "/" in e and not e.startswith("..")})
        return classes, entries, skipped
    classes, entries = [], []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name.startswith("."):
            skipped.append(Skip(printable(name), "hidden entry (not scanned)"))
            continue
        if os.path.isdir(full):
            problem = name_problem(name) or link_problem(full, os.path.realpath(root), None, follow_links)
            if problem:
                skipped.append(Skip(printable(name), f"class folder {problem}"))
                continue
            classes.append(name)
            entries.extend(_walk_class_dir(root, name, skipped, follow_links))
        else:
            skipped.append(Skip(printable(name), "file is not inside a class folder (expected <src>/<class>/<image>)"))
    return classes, entries, skipped


def _check_entry(root: str, rel: str, class_to_idx: dict[str, int], seen: dict[tuple[int, int], str],
                 follow_links: bool) -> Skip | os.stat_result:
    """Reject an entry with a reason, or return its stat result (and record its real path in ``seen``)."""
    problem = name_problem(rel)
    if problem:
        return Skip(printable(rel), f"file {problem}")
    if "/" not in rel or rel.startswith(".."):
        return Skip(rel, "file is not inside a class folder (expected <src>/<class>/<image>)")
    cls, base = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
    if base.startswith("."):
        return Skip(rel, "hidden file")
    if cls not in class_to_idx:
        return Skip(rel, f"class folder {cls!r} is not in the class index")
    if not base.lower().endswith(IMAGE_EXTENSIONS):
        return Skip(rel, f"not an image file extension ({os.path.splitext(base)[1] or 'none'})")
    full = os.path.join(root, rel)
    try:
        st = os.stat(full)
    except OSError as e:
        return Skip(rel, f"unreadable: {e.strerror}")
    key = (st.st_dev, st.st_ino)  # same file via a symlink, a hard link or a repeated list entry
    if key in seen:
        return Skip(rel, f"duplicate entry: same file as {seen[key]}")
    class_real = os.path.realpath(os.path.join(root, cls))
    problem = link_problem(full, os.path.realpath(root), class_real, follow_links)
    if problem:
        return Skip(rel, problem)
    seen[key] = rel
    return st


def scan_image_folder(src: str, file_list: str | None = None, class_index: str | None = None,
                      follow_links: bool = False) -> Listing:
    """List an ImageFolder split (``src/<class>/...``) and assign labels.

    Args:
        src: split directory, e.g. ``data/demo/train``.
        file_list: optional text file, one image path per line relative to ``src`` (``<class>/<file>``; absolute
            paths inside ``src`` are accepted; blank lines and ``#`` comments ignored). Classes are then the first
            path components present in the list.
        class_index: optional JSON ``{class: idx}`` (or ``{"class_to_idx": {...}}``, e.g. the ``classes.json``
            written for the train split) to keep labels identical across splits. Every class needs its own
            non-negative index; classes of the index without a folder in ``src`` are named in ``warnings``.
        follow_links: also follow symlinks that point out of ``src`` (links into another class folder, and loops,
            are never followed; see :mod:`pipeline.convert.scan_checks`).

    Returns:
        The :class:`Listing`; labels follow ``class_to_idx`` (default: sorted class folder names -> 0..C-1).

    Raises:
        ConvertError: ``src`` missing / not a directory, unreadable file list or class index.
    """
    root = os.path.abspath(src)
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise ConvertError(f"--src {src}: {what} (expected an ImageFolder split like data/demo/train)")
    classes, entries, skipped = _listing_entries(root, file_list, follow_links)
    class_to_idx = _load_class_index(class_index) if class_index else {c: i for i, c in enumerate(classes)}
    warning = missing_classes_warning(class_to_idx, classes, class_index, src) if class_index else None
    items, seen, h = [], {}, hashlib.sha256()
    per_class = dict.fromkeys(class_to_idx, 0)
    for rel in entries:
        res = _check_entry(root, rel, class_to_idx, seen, follow_links)
        if isinstance(res, Skip):
            skipped.append(res)
            continue
        cls = rel.split("/", 1)[0]
        items.append(SourceItem(rel, class_to_idx[cls]))
        per_class[cls] += 1
        h.update(f"{rel}\t{res.st_size}\t{res.st_mtime_ns}\t{class_to_idx[cls]}\n".encode())
    for cls in classes:
        if cls in per_class and per_class[cls] == 0:
            skipped.append(Skip(cls, "empty class folder: no image files (the class keeps its index)"))
    h.update(json.dumps(class_to_idx, sort_keys=True).encode())
    return Listing(root, items, class_to_idx, skipped, h.hexdigest(), [warning] if warning else [])


# ------------------------------------------------------------------------------------------------ decoding


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


@dataclass
class SpooledSamples:
    """Prepared samples in sample-index order; JPEG bytes live in one spool file at ``offsets[i]:+sizes[i]``.

    Arrays are (N,) int64. ``paths[i]`` is the source path relative to the source root.
    """

    spool_path: str
    offsets: np.ndarray
    sizes: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int, fh: io.BufferedReader | None = None) -> bytes:
        """JPEG bytes of sample ``i`` (pass an open ``fh`` on the spool file to avoid reopening it)."""
        if fh is None:
            with open(self.spool_path, "rb") as f:
                return self.read(i, f)
        fh.seek(int(self.offsets[i]))
        return fh.read(int(self.sizes[i]))
