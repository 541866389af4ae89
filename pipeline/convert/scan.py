"""[0] ImageFolder scanning and validation for ``convert_dataset.py``; free of FFCV/DALI imports (plain workers).

:func:`scan_image_folder` lists ``<src>/<class>/**/<file>`` (or a file list), assigns labels from ``class_to_idx``
(sorted class folders unless given), and returns the candidates plus every input it rejected up front (non-image
extension, hidden, outside a class folder, duplicate, unreadable, empty class), each with a reason, and a fingerprint
of the listing (path, size, mtime) that tells a converter whether an output is up to date. Turning one file into the
stored bytes is :mod:`pipeline.convert.prepare`; :class:`SpooledSamples` holds the prepared samples for the writers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from pipeline.convert.scan_checks import (
    ConvertError,
    link_problem,
    load_class_index,
    missing_classes_warning,
    name_problem,
    printable,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


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
