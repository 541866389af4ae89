"""Built-in demo dataset: determinism, caching, balance, and that colour statistics do not give classes away."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert.demo_dataset import CLASSES, ensure_demo_dataset, main

TINY = {"n_classes": 10, "train_per_class": 6, "val_per_class": 2, "size": 48}


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "train").rglob("*.jpg")) + sorted((root / "val").rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def counts(root: Path, split: str) -> dict[str, int]:
    return {d.name: len(list(d.iterdir())) for d in sorted((root / split).iterdir())}


def test_deterministic_balanced_and_independent_of_workers(tmp_path):
    params = {**TINY, "train_per_class": 18, "size": 32}  # 200 images: large enough for the process pool path
    a = Path(ensure_demo_dataset(str(tmp_path / "a"), workers=1, log=lambda m: None, **params))
    b = Path(ensure_demo_dataset(str(tmp_path / "b"), workers=2, log=lambda m: None, **params))
    assert tree_hash(a) == tree_hash(b)
    assert counts(a, "train") == dict.fromkeys(sorted(CLASSES), 18)
    assert counts(a, "val") == dict.fromkeys(sorted(CLASSES), 2)
    c = Path(ensure_demo_dataset(str(tmp_path / "c"), workers=1, log=lambda m: None, **{**params, "seed": 1}))
    assert tree_hash(c) != tree_hash(a)
    with Image.open(a / "train/star/00000.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))


def test_cache_hit_param_change_and_partial_tree(tmp_path):
    root, logs = tmp_path / "demo", []
    ensure_demo_dataset(str(root), workers=1, log=logs.append, **TINY)
    assert len(logs) == 1
    (root / "ffcv").mkdir()
    (root / "ffcv/train.beton").write_bytes(b"converted output")  # must survive regeneration
    stamp = (root / "manifest.json").stat().st_mtime_ns
    ensure_demo_dataset(str(root), workers=1, log=logs.append, **TINY)
    assert len(logs) == 1 and (root / "manifest.json").stat().st_mtime_ns == stamp  # cache hit: nothing done
    ensure_demo_dataset(str(root), workers=1, log=logs.append, **{**TINY, "val_per_class": 3})
    assert len(logs) == 2 and counts(root, "val") == dict.fromkeys(sorted(CLASSES), 3)
    assert json.loads((root / "manifest.json").read_text())["params"]["val_per_class"] == 3
    (root / "train/ring/00002.jpg").unlink()  # partial tree
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f".demo.tmp-{dead.pid}/train").mkdir(parents=True)  # leftover of a killed run
    ensure_demo_dataset(str(root), workers=1, log=logs.append, **{**TINY, "val_per_class": 3})
    assert len(logs) == 3 and (root / "train/ring/00002.jpg").exists()
    assert (root / "ffcv/train.beton").read_bytes() == b"converted output"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_cli_generates(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "d"), "--n-classes", "3", "--train-per-class", "2", "--val-per-class", "1",
            "--size", "24"]
    assert main(argv) == 0 and "demo dataset ready" in capsys.readouterr().out
    assert counts(tmp_path / "d", "train") == dict.fromkeys(sorted(CLASSES[:3]), 2)
    assert main(["--out", str(tmp_path / "e"), "--n-classes", "11"]) == 1
    assert "n_classes" in capsys.readouterr().err and not (tmp_path / "e/manifest.json").exists()


def load_thumbnails(root: Path, split: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, cls in enumerate(sorted(CLASSES)):
        for p in sorted((root / split / cls).iterdir()):
            with Image.open(p) as im:
                xs.append(np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BOX), np.float32))
            ys.append(label)
    return np.stack(xs).reshape(len(xs), -1), np.array(ys)


def knn_accuracy(train: np.ndarray, ytrain: np.ndarray, test: np.ndarray, ytest: np.ndarray, k: int = 10) -> float:
    d = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :k]
    pred = np.array([np.bincount(ytrain[row], minlength=len(CLASSES)).argmax() for row in nearest])
    return float((pred == ytest).mean())


def test_raw_thumbnail_knn_is_near_chance(tmp_path):
    """8x8 raw pixels (global colour + coarse layout) must not reveal the class; chance is 10%.

    The same kNN on a colour-coded control (each class tinted towards its own colour) must succeed, so a low score
    means the features carry no class information, not that the kNN is broken.
    """
    root = Path(ensure_demo_dataset(str(tmp_path / "demo"), workers=2, log=lambda m: None, n_classes=10,
                                    train_per_class=30, val_per_class=10, size=112))
    xtr, ytr = load_thumbnails(root, "train", 8)
    xva, yva = load_thumbnails(root, "val", 8)
    acc = knn_accuracy(xtr, ytr, xva, yva)
    assert acc < 0.35, f"8x8 thumbnail kNN accuracy {acc:.2f}: class identity leaks through colour/layout"
    corners = [(r, g, b) for r in (0, 255) for g in (0, 255) for b in (0, 255)] + [(96, 96, 96), (160, 160, 160)]
    tint = np.array(corners, np.float32)[:, None, :].repeat(64, 1).reshape(10, -1)  # 10 distinct colours
    control = knn_accuracy(0.3 * xtr + 0.7 * tint[ytr], ytr, 0.3 * xva + 0.7 * tint[yva], yva)
    assert control > 0.9, f"control kNN only {control:.2f}"


def test_grey_levels_are_apart_and_in_range():
    from pipeline.convert.demo_dataset import MIN_CONTRAST, _grey_levels

    rng = np.random.default_rng(0)
    draws = np.array([_grey_levels(rng, 3) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 255
    gaps = np.abs(draws[:, :, None] - draws[:, None, :])[:, [0, 0, 1], [1, 2, 2]]
    assert gaps.min() >= MIN_CONTRAST - 1e-9
    assert draws[:, 0].std() > 50  # every role takes the whole range (random order), not a fixed dark-to-light
    with pytest.raises(ValueError, match="cannot be"):
        _grey_levels(rng, 5)


def test_images_carry_no_colour(tmp_path):
    """Version 3 is grey: the three channels differ only by the pixel noise (no per-image colour cue)."""
    root = Path(ensure_demo_dataset(str(tmp_path / "demo"), workers=1, log=lambda m: None, **TINY))
    for p in sorted((root / "train").rglob("*.jpg")):
        with Image.open(p) as im:
            x = np.asarray(im.convert("RGB"), np.float32)
        assert np.abs(x - x.mean(axis=2, keepdims=True)).mean() < 8, p
