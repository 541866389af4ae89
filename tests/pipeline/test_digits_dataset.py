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
