"""Built-in demo dataset: procedurally drawn shapes and textures in ImageFolder layout (no downloads).

``python -m pipeline.convert.demo_dataset --out data/demo`` writes ``data/demo/{train,val}/<class>/<nnnnn>.jpg`` plus
``data/demo/manifest.json``. Ten classes whose identity is invariant to colour, position, scale and rotation: shapes
(``circle``, ``ring``, ``triangle``, ``square``, ``star``, ``cross``, ``spiral``) and two-level textures filling a
random region (``stripes``, ``checkerboard``, ``dots``).

Each image draws three grey levels at least ``MIN_CONTRAST`` apart, the object near the centre at a random scale
(52-90 % of the side) and rotation, Gaussian pixel noise and sometimes a slight blur; masks are drawn at 2x and
box-filtered down; files are JPEG at ``jpeg_quality``. Nothing but shape, texture, grey levels and pose tells two
images apart, on purpose: the EMA-teacher methods learn instance discrimination first, and any per-image cue that
survives augmentation (a colour relation, a unique clutter stroke) would be learnt instead of the class
(``docs/results.md`` has the measurements).

Determinism: image ``(split, class c, index i)`` comes from ``numpy.random.default_rng([seed, split_id, c, i])``, so
the bytes do not depend on the number of workers. ``manifest.json`` (generator version, parameters, file counts) is
written last and atomically; :func:`ensure_demo_dataset` returns at once when it matches, else regenerates into a
temporary directory and swaps the split folders in (converted ``ffcv/``/``dali/`` outputs are left alone).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from runtime.atomic import write_text_atomic
from runtime.procs import pid_alive

GENERATOR_VERSION = 3
CLASSES = ("circle", "ring", "triangle", "square", "star", "cross", "spiral", "stripes", "checkerboard", "dots")
SPLITS = {"train": 0, "val": 1}
DEFAULTS = {"n_classes": 10, "train_per_class": 260, "val_per_class": 50, "size": 112, "jpeg_quality": 90, "seed": 0}
SS = 2  # supersampling factor of masks and patterns (antialiased edges)
RADIUS = (0.26, 0.45)  # object radius as a fraction of the side (diameter 52-90%)
CENTRE_JITTER = 0.12  # object centre uniform in [0.5 - j, 0.5 + j] of the side
MIN_CONTRAST = 70  # minimum difference between the grey levels of one image (0-255)


# ------------------------------------------------------------------------------------------------ drawing


def _grey_levels(rng: np.random.Generator, k: int) -> list[float]:
    """``k`` grey levels in [0, 255], pairwise at least ``MIN_CONTRAST`` apart, in random order (drawn directly:
    the gaps beyond the minimum split the remaining range at sorted uniform points, so no rejection loop)."""
    slack = 255.0 - MIN_CONTRAST * (k - 1)
    if slack < 0:
        raise ValueError(f"{k} grey levels cannot be {MIN_CONTRAST} apart within 0..255")
    levels = np.sort(rng.uniform(0, slack, size=k)) + MIN_CONTRAST * np.arange(k)
    return [float(v) for v in rng.permutation(levels)]


def _rotated(points: np.ndarray, angle: float, centre: np.ndarray, scale: float) -> list[tuple[float, float]]:
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [tuple(p) for p in (points @ rot.T) * scale + centre]


def _star(n_points: int, inner: float) -> np.ndarray:
    ang = np.arange(2 * n_points) * math.pi / n_points
    rad = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.sin(ang), -rad * np.cos(ang)], axis=1)


def _cross(arm: float) -> np.ndarray:
    a = arm / 2
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a],
                     [-1, -a], [-a, -a]])


def _shape_mask(name: str, rng: np.random.Generator, n: int, centre: np.ndarray, r: float) -> Image.Image:
    """(n, n) 'L' mask of one shape class with radius ``r`` around ``centre``, random rotation."""
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    angle = rng.uniform(0, 2 * math.pi)
    box = [centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r]
    if name in ("circle", "ring"):
        d.ellipse(box, fill=255)
        if name == "ring":
            ri = r * rng.uniform(0.5, 0.7)
            d.ellipse([centre[0] - ri, centre[1] - ri, centre[0] + ri, centre[1] + ri], fill=0)
    elif name == "triangle":
        d.polygon(_rotated(_star(3, 0.5)[::2], angle, centre, r), fill=255)
    elif name == "square":
        d.polygon(_rotated(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.75, angle, centre, r), fill=255)
    elif name == "star":
        d.polygon(_rotated(_star(5, rng.uniform(0.38, 0.5)), angle, centre, r), fill=255)
    elif name == "cross":
        d.polygon(_rotated(_cross(rng.uniform(0.5, 0.7)), angle, centre, r), fill=255)
    elif name == "spiral":
        turns = rng.uniform(2.0, 3.0)
        t = np.linspace(0, 1, 400)
        pts = np.stack([t * np.cos(2 * math.pi * turns * t), t * np.sin(2 * math.pi * turns * t)], axis=1)
        width = max(2, int(r / (turns * 2.2)))
        d.line(_rotated(pts, angle, centre, r), fill=255, width=width, joint="curve")
    else:
        raise ValueError(f"unknown shape class {name!r}")
    return mask


def _texture(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n) float32 pattern in {0, 1} of a texture class, random period/phase/rotation."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, 100)
    v = -xx * math.sin(angle) + yy * math.cos(angle) + rng.uniform(0, 100)
    period = rng.uniform(0.09, 0.16) * n
    if name == "stripes":
        return (np.mod(u, period) < period * rng.uniform(0.4, 0.6)).astype(np.float32)
    if name == "checkerboard":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if name == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (du**2 + dv**2 < (period * rng.uniform(0.25, 0.35)) ** 2).astype(np.float32)
    raise ValueError(f"unknown texture class {name!r}")


def _region_mask(rng: np.random.Generator, n: int, centre: np.ndarray, r: float) -> Image.Image:
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    ax = r * rng.uniform(0.7, 1.0, size=2)
    if rng.random() < 0.5:
        d.ellipse([centre[0] - ax[0], centre[1] - ax[1], centre[0] + ax[0], centre[1] + ax[1]], fill=255)
    else:
        pts = np.array([[-ax[0], -ax[1]], [ax[0], -ax[1]], [ax[0], ax[1]], [-ax[0], ax[1]]]) / r
        d.polygon(_rotated(pts, rng.uniform(0, math.pi), centre, r), fill=255)
    return mask


def _down(mask: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """(size, size, 1) float32 in [0, 1]: a 2x-supersampled 0/255 mask (or 0/1 array) box-filtered to ``size``."""
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray((mask * 255).astype(np.uint8))
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[:, :, None] / 255.0


def render(class_id: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One demo image of class ``CLASSES[class_id]``; masks and patterns are drawn at 2x, composited at 1x.

    Returns:
        (size, size, 3) uint8 RGB.
    """
    n = size * SS
    bg, fg, fg2 = _grey_levels(rng, 3)
    r = rng.uniform(*RADIUS) * n
    centre = rng.uniform(0.5 - CENTRE_JITTER, 0.5 + CENTRE_JITTER, size=2) * n
    name = CLASSES[class_id]
    if name in ("stripes", "checkerboard", "dots"):
        pattern = _down(_texture(name, rng, n), size)
        fg = pattern * fg + (1 - pattern) * fg2
        m = _down(_region_mask(rng, n, centre, r * 1.15), size)
    else:
        m = _down(_shape_mask(name, rng, n, centre, r), size)
    grey = np.repeat(m * fg + (1 - m) * bg, 3, axis=2)
    img = Image.fromarray(np.clip(grey + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noise = rng.standard_normal(size=(size, size, 3), dtype=np.float32) * rng.uniform(2, 8)
    return np.clip(np.asarray(img, dtype=np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ generation


def _params(**overrides: int) -> dict[str, int]:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"ensure_demo_dataset: unknown parameter(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **{k: int(v) for k, v in overrides.items()}}
    if not 2 <= p["n_classes"] <= len(CLASSES):
        raise ValueError(f"n_classes must be in 2..{len(CLASSES)}, got {p['n_classes']}")
    if p["train_per_class"] < 1 or p["val_per_class"] < 0 or p["size"] < 16 or not 1 <= p["jpeg_quality"] <= 100:
        raise ValueError(f"invalid demo dataset parameters {p}")
    return p


def image_path(split: str, class_id: int, index: int) -> str:
    """Relative path of one demo image, e.g. ``train/circle/00007.jpg``."""
    return f"{split}/{CLASSES[class_id]}/{index:05d}.jpg"


def _make_one(task: tuple[str, str, int, int, dict[str, int]]) -> None:
    out_root, split, class_id, index, p = task
    rng = np.random.default_rng([p["seed"], SPLITS[split], class_id, index])
    arr = render(class_id, rng, p["size"])
    Image.fromarray(arr).save(os.path.join(out_root, image_path(split, class_id, index)), format="JPEG",
                              quality=p["jpeg_quality"], optimize=True)


def _tasks(out_root: str, p: dict[str, int]) -> list[tuple[str, str, int, int, dict[str, int]]]:
    per = {"train": p["train_per_class"], "val": p["val_per_class"]}
    return [(out_root, s, c, i, p) for s in SPLITS for c in range(p["n_classes"]) for i in range(per[s])]


def _count_files(root: str, split: str) -> int:
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        return -1
    return sum(len(files) for _, _, files in os.walk(d))


def _is_current(root: str, doc: dict) -> bool:
    """True when ``root/manifest.json`` has ``doc``'s generator, version and params and the file counts match."""
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    if any(m.get(k) != doc.get(k) for k in ("generator", "version", "params")):
        return False
    return all(_count_files(root, s) == m.get("counts", {}).get(s) for s in SPLITS)


def _generate(tmp: str, p: dict[str, int], workers: int) -> dict[str, int]:
    for s in SPLITS:
        for c in range(p["n_classes"]):
            os.makedirs(os.path.join(tmp, s, CLASSES[c]))
    tasks = _tasks(tmp, p)
    if workers <= 1 or len(tasks) < 200:
        for t in tasks:
            _make_one(t)
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(_make_one, tasks, chunksize=32):
                pass
    return {s: _count_files(tmp, s) for s in SPLITS}


def _swap_in(root: str, tmp: str) -> None:
    """Move ``tmp/<split>`` to ``root/<split>`` (old split folders are moved aside into ``tmp`` and deleted)."""
    for s in SPLITS:
        final, old = os.path.join(root, s), os.path.join(tmp, f"old-{s}")
        if os.path.lexists(final):
            os.rename(final, old)
        os.rename(os.path.join(tmp, s), final)


def ensure_demo_dataset(root: str = "data/demo", *, workers: int | None = None, force: bool = False,
                        log: Callable[[str], None] = print, **params: int) -> str:
    """Generate the demo dataset under ``root`` unless an identical one is already there.

    Args:
        root: output directory (``root/train``, ``root/val``, ``root/manifest.json``).
        workers: generator processes (None = all cores).
        force: regenerate even when the manifest matches.
        log: status output.
        **params: overrides of :data:`DEFAULTS` (n_classes, train_per_class, val_per_class, size, jpeg_quality, seed).

    Returns:
        ``root``.
    """
    p = _params(**params)
    doc = {"generator": "flashssl demo shapes", "version": GENERATOR_VERSION, "params": p,
           "classes": list(CLASSES[: p["n_classes"]])}
    return write_image_folder(root, doc, lambda tmp: _generate(tmp, p, workers or os.cpu_count() or 1), force=force,
                              log=log, what=f"demo dataset: {p['n_classes']} classes, {p['size']} px")


def write_image_folder(root: str, doc: dict, generate: Callable[[str], dict[str, int]], *, force: bool = False,
                       log: Callable[[str], None] = print, what: str = "dataset") -> str:
    """Write an ImageFolder ``root/{train,val}/<class>/...`` once, atomically, with ``root/manifest.json``.

    Args:
        doc: manifest fields; ``generator``, ``version`` and ``params`` decide whether ``root`` is already current.
        generate: writes ``tmp/{train,val}/...`` under the temporary folder it gets and returns the file counts.
        force: regenerate even when the manifest matches.
    Returns:
        ``root``.
    """
    if not force and _is_current(root, doc):
        return root
    t0 = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    for entry in os.listdir(root):  # leftovers of killed runs (their pid is gone)
        if entry.startswith(".demo.tmp-") and entry[10:].isdigit() and not pid_alive(int(entry[10:])):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    tmp = os.path.join(root, f".demo.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    manifest = os.path.join(root, "manifest.json")
    try:
        counts = generate(tmp)
        if os.path.exists(manifest):
            os.remove(manifest)  # from here on a partial swap is detected as "not current"
        _swap_in(root, tmp)
        write_text_atomic(manifest, json.dumps({**doc, "counts": counts}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{what}: {counts['train']} train + {counts['val']} val images -> {root} ({time.perf_counter() - t0:.1f} s)")
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate the built-in demo dataset (shapes and textures, ImageFolder)")
    ap.add_argument("--out", default="data/demo", help="output root (default data/demo)")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v, help=f"default {v}")
    ap.add_argument("-j", "--workers", type=int, default=0, help="processes (0 = all cores)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = vars(ap.parse_args(argv))
    out, workers, force = args.pop("out"), args.pop("workers"), args.pop("force")
    try:
        root = ensure_demo_dataset(out, workers=workers or None, force=force, **args)
    except ValueError as e:
        print(f"demo_dataset: error: {e}", file=sys.stderr)
        return 1
    print(f"demo dataset ready: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
