"""Labelled subsets for semi-supervised fine-tuning: read a SimCLR-style list, or draw a class-balanced one.

A subset file has one image per line, named by its file name as in the published ImageNet 1 % / 10 % lists
(``n01440764_10026.JPEG``); ``class/file`` is accepted too, for datasets whose file names repeat across classes.
Blank lines and ``#`` comments are ignored. Names are matched against the source file of every sample:
``ImageFolder.samples`` for a directory, the ``<stem>.samples.tsv`` that ``convert_dataset.py`` writes next to a
``.beton`` (column ``path``; sample ``i`` of the file is row ``i``).

The drawn subset takes ``max(1, round(n_c * perc / 100))`` images of every class ``c`` (n_c images), chosen by a
permutation seeded with ``seed``, and is written back in the same format so that a run can be repeated with
``--subset``.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from evaluation.eval_loaders import EvalSplit
from runtime.atomic import write_text_atomic
from runtime.config_loader import ConfigError


def source_paths(split: EvalSplit) -> list[str]:
    """The source file of every sample of ``split``, in dataset order (ConfigError if a .beton has no record)."""
    folder = getattr(split, "folder", None)
    if folder is not None:
        return [p for p, _ in folder.samples]
    tsv = os.path.splitext(split.path)[0] + ".samples.tsv"
    if not os.path.isfile(tsv):
        raise ConfigError(f"--subset: {split.path} has no {os.path.basename(tsv)} next to it (written by "
                          "convert_dataset.py), so its file names are unknown; re-convert it, or pass the ImageFolder")
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if len(rows) != split.n or any("path" not in r for r in rows):
        raise ConfigError(f"--subset: {tsv} lists {len(rows)} samples with a 'path' column, but {split.path} has "
                          f"{split.n}; the sidecar belongs to another conversion")
    return [r["path"] for r in rows]


def _short_name(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def read_subset(subset_file: str, paths: Sequence[str]) -> list[int]:
    """Sorted dataset indices of the images named in ``subset_file``; ConfigError naming unmatched names."""
    try:
        with open(subset_file) as f:
            names = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ConfigError(f"--subset: cannot read {subset_file}: {e}") from None
    if not names:
        raise ConfigError(f"--subset: {subset_file} names no images")
    by_name, by_short = defaultdict(list), defaultdict(list)
    for i, p in enumerate(paths):
        by_name[os.path.basename(p)].append(i)
        by_short[_short_name(p)].append(i)
    chosen, missing, ambiguous = set(), [], []
    for name in names:
        hits = (by_short if "/" in name else by_name).get(name, [])
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            ambiguous.append(name)
        else:
            chosen.add(hits[0])
    if missing:
        raise ConfigError(f"--subset: {len(missing)} of the {len(names)} names in {subset_file} match no image of the "
                          f"training data (e.g. {', '.join(missing[:5])}); is it the list for this dataset?")
    if ambiguous:
        raise ConfigError(f"--subset: names in {subset_file} match several images (e.g. {', '.join(ambiguous[:3])}); "
                          "write them as class/file")
    return sorted(chosen)


def draw_balanced(labels: np.ndarray, perc: float, seed: int) -> list[int]:
    """Sorted indices of ``max(1, round(n_c * perc / 100))`` seeded random images of every class present."""
    g = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(len(members) * perc / 100))
        pick = torch.randperm(len(members), generator=g)[:k].numpy()
        chosen.extend(members[pick].tolist())
    return sorted(chosen)


def subset_names(paths: Sequence[str], indices: Sequence[int]) -> list[str]:
    """The lines of a subset file for ``indices``: file names, or class/file where a file name repeats."""
    counts: dict[str, int] = defaultdict(int)
    for p in paths:
        counts[os.path.basename(p)] += 1
    return [os.path.basename(paths[i]) if counts[os.path.basename(paths[i])] == 1 else _short_name(paths[i])
            for i in indices]


def write_subset(path: str, names: Sequence[str]) -> None:
    """Write ``names`` one per line, atomically."""
    write_text_atomic(path, "".join(f"{n}\n" for n in names))
