"""The real-image check set: scikit-learn's digit scans written as an ImageFolder, once, reused while current."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.convert.digits_dataset import ensure_digits_dataset, main


def test_writes_every_scan_once_as_an_upsampled_grey_imagefolder(tmp_path):
    from sklearn.datasets import load_digits

    root = tmp_path / "digits"
    logs = []
    ensure_digits_dataset(str(root), size=16, log=logs.append)
    manifest = json.loads((root / "manifest.json").read_text())
    target = load_digits().target
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == len(target) == 1797
    for c in range(10):  # every 5th scan of each class (in sklearn's order) is held out
        n = int((target == c).sum())
        assert len(list((root / "val" / str(c)).iterdir())) == (n + 4) // 5
        assert len(list((root / "train" / str(c)).iterdir())) == n - (n + 4) // 5
    img = np.asarray(Image.open(root / "train" / "3" / "00000.png"))
    assert img.shape == (16, 16, 3) and (img[..., 0] == img[..., 2]).all() and img.max() > 200
    stamp = (root / "manifest.json").stat().st_mtime_ns
    ensure_digits_dataset(str(root), size=16, log=logs.append)
    assert len(logs) == 1 and (root / "manifest.json").stat().st_mtime_ns == stamp  # cache hit: nothing done


def test_bad_parameters_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="size >= 8"):
        ensure_digits_dataset(str(tmp_path / "a"), size=4)
    assert main(["--out", str(tmp_path / "b"), "--val-every", "1"]) == 2
    assert "val_every" in capsys.readouterr().err and not (tmp_path / "b" / "manifest.json").exists()


def _pixels(root, split="train", cls="7", name="00003.png"):
    return np.asarray(Image.open(root / split / cls / name))[..., 0]


def test_random_placement_is_seeded_and_keeps_each_scan_whole_inside_the_canvas(tmp_path):
    from pipeline.convert.digits_dataset import DIGIT_SIDE

    a, b, c = (tmp_path / n for n in "abc")
    ensure_digits_dataset(str(a), size=32, seed=0, log=lambda _: None)
    ensure_digits_dataset(str(b), size=32, seed=0, log=lambda _: None)
    ensure_digits_dataset(str(c), size=32, seed=1, log=lambda _: None)
    assert (_pixels(a) == _pixels(b)).all() and not (_pixels(a) == _pixels(c)).all()
    boxes = []
    for path in sorted((a / "val" / "0").iterdir())[:20]:  # a zero's scan touches its 8x8 block's edges
        ys, xs = np.nonzero(np.asarray(Image.open(path))[..., 0] > 0)
        boxes.append((ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
    sides = [max(h, w) for _, _, h, w in boxes]
    assert min(sides) >= DIGIT_SIDE[0] * 32 * 0.5 and max(sides) <= DIGIT_SIDE[1] * 32 + 1, sides
    assert len({(y, x) for y, x, _, _ in boxes}) > 10  # positions vary


def test_center_placement_fills_the_canvas(tmp_path):
    ensure_digits_dataset(str(tmp_path / "d"), size=16, placement="center", log=lambda _: None)
    img = np.asarray(Image.open(tmp_path / "d" / "val" / "0" / "00000.png"))[..., 0]
    ys, xs = np.nonzero(img > 32)
    assert ys.max() - ys.min() >= 10 and xs.max() - xs.min() >= 8
    with pytest.raises(ValueError, match="placement"):
        ensure_digits_dataset(str(tmp_path / "e"), placement="corner")
