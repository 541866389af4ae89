"""Real-image check set: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``) as an ImageFolder.

The 1,797 images are real scans shipped inside scikit-learn (the UCI "Optical Recognition of Handwritten Digits"
test set: 8x8 blocks of 4x4-pixel counts, 0-16, from 43 writers), 10 classes. Nothing is downloaded and nothing is
drawn by the project. ``python -m pipeline.convert.digits_dataset --out data/digits`` writes
``data/digits/{train,val}/<digit>/<nnnnn>.png``: grey levels 0-16 -> 0-255, each scan upsampled (bicubic) to a
random side of 45-80 % of ``size`` and pasted at a random position on a black ``size`` px canvas (seeded; or, with
``placement="center"``, upsampled to the whole canvas), saved as RGB PNG (lossless); every ``val_every``-th image of
each class (in sklearn's order) goes to ``val``, the rest to ``train`` (1,433 / 364 with the defaults).

Why the random placement: centred, the scans are so regular that a random-init ResNet-18 already reaches ~94 %
kNN@20 and a short SSL run can barely show a gain; at random scales and positions the random init reaches ~52 %, and
what a method adds is the invariance to position and scale that its crops teach. Generation takes about a second;
the folder is written atomically with a manifest by :func:`pipeline.convert.demo_dataset.write_image_folder` and
reused while it is current.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline.convert.demo_dataset import write_image_folder

GENERATOR_VERSION = 2
DEFAULTS = {"size": 32, "val_every": 5, "placement": "random", "seed": 0}
PLACEMENTS = ("random", "center")
DIGIT_SIDE = (0.45, 0.8)  # random placement: the scan's side as a fraction of the canvas side, uniform


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is pinned in requirements.txt
        raise RuntimeError("the real-image check set needs scikit-learn (pip install -r requirements.txt)") from e
    d = load_digits()
    return d.images, d.target  # (1797, 8, 8) float 0-16, (1797,) int


def place(grey: Image.Image, size: int, placement: str, rng: np.random.Generator) -> Image.Image:
    """One 8x8 scan (mode "L") -> a ``size`` px RGB image: upsampled to the whole canvas ("center"), or to a random
    side in ``DIGIT_SIDE`` x ``size`` at a random position on a black canvas ("random")."""
    if placement == "center":
        return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    side = int(rng.integers(round(DIGIT_SIDE[0] * size), round(DIGIT_SIDE[1] * size) + 1))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(grey.resize((side, side), Image.Resampling.BICUBIC), (x, y))
    return canvas.convert("RGB")


def _generate(tmp: str, size: int, val_every: int, placement: str, seed: int) -> dict[str, int]:
    images, labels = _load()
    rng = np.random.default_rng(seed)  # draws in sklearn's order: the set is a function of the parameters
    per_folder: dict[tuple[str, int], int] = {}  # (split, class) -> images written
    seen = np.zeros(10, dtype=int)
    for img, label in zip(images, labels, strict=True):
        split = "val" if seen[label] % val_every == 0 else "train"
        seen[label] += 1
        folder = os.path.join(tmp, split, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        index = per_folder.get((split, int(label)), 0)
        per_folder[(split, int(label))] = index + 1
        grey = Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8))
        place(grey, size, placement, rng).save(os.path.join(folder, f"{index:05d}.png"))
    return {s: sum(n for (split, _), n in per_folder.items() if split == s) for s in ("train", "val")}


def ensure_digits_dataset(root: str = "data/digits", *, size: int = DEFAULTS["size"],
                          val_every: int = DEFAULTS["val_every"], placement: str = DEFAULTS["placement"],
                          seed: int = DEFAULTS["seed"], force: bool = False,
                          log: Callable[[str], None] = print) -> str:
    """Write the digits ImageFolder under ``root`` unless an identical one is there. Returns ``root``."""
    if size < 8 or val_every < 2:
        raise ValueError(f"digits dataset: need size >= 8 and val_every >= 2, got size={size}, val_every={val_every}")
    if placement not in PLACEMENTS:
        raise ValueError(f"digits dataset: placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    doc = {"generator": "sklearn load_digits", "version": GENERATOR_VERSION,
           "params": {"size": size, "val_every": val_every, "placement": placement, "seed": seed},
           "classes": [str(c) for c in range(10)]}
    return write_image_folder(root, doc, lambda tmp: _generate(tmp, size, val_every, placement, seed), force=force,
                              log=log, what=f"digits dataset: {size} px, {placement} placement")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write scikit-learn's digits scans as an ImageFolder (real images)")
    ap.add_argument("--out", default="data/digits", help="output root (default data/digits)")
    ap.add_argument("--size", type=int, default=DEFAULTS["size"], help="side in pixels (default 32)")
    ap.add_argument("--val-every", type=int, default=DEFAULTS["val_every"], help="every n-th image to val (5)")
    ap.add_argument("--placement", choices=PLACEMENTS, default=DEFAULTS["placement"],
                    help="random: each scan at a random scale and position on a black canvas (default);\n"
                         "center: each scan upsampled to the whole image")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the random placement (0)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = ap.parse_args(argv)
    try:
        ensure_digits_dataset(args.out, size=args.size, val_every=args.val_every, placement=args.placement,
                              seed=args.seed, force=args.force)
    except (ValueError, RuntimeError) as e:
        print(f"digits_dataset: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
