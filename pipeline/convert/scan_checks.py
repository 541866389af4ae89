"""[0] Checks of the ImageFolder listing that keep bad names, links and class indices out of a conversion.

Used by :mod:`pipeline.convert.scan` (which re-exports :class:`ConvertError`, defined here so that both modules can
raise it). The name and link checks return the user-facing skip reason (``None`` = fine); :func:`load_class_index`
raises ValueError with the user-facing message for an unusable ``--class-index``:

* names: a file or class folder name that is not valid UTF-8 (Python keeps it as lone surrogates; it cannot be
  written to the UTF-8 sidecars) or that holds a tab / line break (each would split a row of ``samples.tsv``);
* links: a directory or file symlink that points back to one of its own ancestors (a loop), into another class
  folder of ``--src`` (its images would get this class's label), or out of ``--src`` (only with ``follow_links``);
* class index: every class needs its own non-negative integer index (two classes on one index merge them);
* outputs: the folder an output goes to must be creatable and writable (checked before any image is decoded).
"""

from __future__ import annotations

import json
import os
import tempfile

_TSV_BREAKERS = ("\t", "\n", "\r")


class ConvertError(Exception):
    """A user-facing conversion error (bad arguments, missing/empty input, --strict failures); no traceback."""


def printable(name: str) -> str:
    """``name`` with undecodable bytes shown as ``\\xNN`` (safe to print and to store in JSON)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def name_problem(name: str) -> str | None:
    """Why ``name`` (a relative path or a folder name) cannot be stored, or None."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8 (rename it, e.g. convmv -f latin1 -t utf8)"
    if any(c in name for c in _TSV_BREAKERS):
        return "name contains a tab or line break, which would corrupt samples.tsv (rename it)"
    return None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def link_problem(full: str, root_real: str, class_real: str | None, follow_links: bool) -> str | None:
    """Why the entry at ``full`` (inside class folder ``class_real`` of ``root_real``, both real paths; None for a
    class folder itself) must not be followed, or None. Non-links are always fine."""
    if not os.path.islink(full):
        return None
    target = os.path.realpath(full)
    parent = os.path.realpath(os.path.dirname(full))
    if os.path.isdir(target) and _inside(parent, target):
        return f"symlink loop: points back to its own folder {target}; not followed"
    if class_real is not None and _inside(target, class_real):
        return None
    if _inside(target, root_real):
        other = os.path.relpath(target, root_real)
        return (f"symlink into another folder of --src ({other}); not followed, it would give those images this "
                "class's label")
    if not follow_links:
        return f"symlink out of --src (to {target}); not followed (pass --follow-links to include it)"
    return None


def load_class_index(path: str) -> dict[str, int]:
    """``{class: index}`` from a JSON file (``{class: int}`` or ``{"class_to_idx": {...}}``); raises ValueError with
    the user-facing message unless every class has its own non-negative integer index."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--class-index {path}: cannot read JSON ({e})") from None
    mapping = data.get("class_to_idx", data) if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in mapping.values()):
        raise ValueError(f"--class-index {path}: expected {{class_name: int}} or {{'class_to_idx': {{...}}}}")
    negative = {k: v for k, v in mapping.items() if v < 0}
    if negative:
        raise ValueError(f"--class-index {path}: negative index for {_few(negative)}; indices must be 0, 1, 2, ... "
                         "(use the classes.json written for the train split)")
    by_index: dict[int, list[str]] = {}
    for k, v in mapping.items():
        by_index.setdefault(v, []).append(str(k))
    shared = {i: names for i, names in by_index.items() if len(names) > 1}
    if shared:
        i, names = min(shared.items())
        raise ValueError(f"--class-index {path}: classes {', '.join(map(repr, names))} share index {i} "
                         f"({len(shared)} shared index(es)); each class needs its own index, or they would be merged")
    return {str(k): int(v) for k, v in mapping.items()}


def missing_classes_warning(class_to_idx: dict[str, int], found: list[str], index_path: str, src: str) -> str | None:
    """The warning for classes of the class index that have no folder in ``src`` (a split missing classes)."""
    missing = sorted(set(class_to_idx) - set(found), key=class_to_idx.__getitem__)
    if not missing:
        return None
    return (f"{len(missing)} of the {len(class_to_idx)} classes of --class-index {index_path} have no folder in "
            f"--src {src}: {_few(dict.fromkeys(missing, ''), values=False)}; this split has no images of them (their "
            "accuracy cannot be measured on it)")


def _few(mapping: dict, values: bool = True, n: int = 5) -> str:
    items = [f"{k!r}" + (f" ({v})" if values else "") for k, v in list(mapping.items())[:n]]
    return ", ".join(items) + (f" and {len(mapping) - n} more" if len(mapping) > n else "")


def check_writable(folders: list[str]) -> None:
    """Raise ConvertError unless each folder exists (or can be created) and accepts a new file; names the folder."""
    for folder in folders:
        probe = folder
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ConvertError(f"--out: cannot create {folder}: {probe} is a file, not a folder; choose another --out")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
        except OSError as e:
            raise ConvertError(f"--out: cannot write to {probe} ({e.strerror or e}); choose a writable --out or fix "
                               "its permissions") from None
        os.close(fd)
        os.remove(tmp)
