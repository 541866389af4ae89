"""eval.py voc07: AP definitions against a naive reference, the SVM protocol on separable features, the VOC directory
reader's errors, and the command end to end on a tiny VOC-layout fixture."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from evaluation.voc07 import VOC_CLASSES, read_voc_split, voc07_svm
from evaluation.voc_ap import ap_11point, ap_area
from runtime.config_loader import ConfigError


def _naive_pr(scores, labels):
    """Precision and recall after each rank, by explicit counting (difficult images removed first)."""
    items = sorted([(s, y) for s, y in zip(scores, labels) if y != -1], key=lambda t: -t[0])
    n_pos = sum(1 for _, y in items if y == 1)
    out, tp = [], 0
    for k, (_, y) in enumerate(items, 1):
        tp += y == 1
        out.append((tp / k, tp / n_pos, y == 1))
    return out


def naive_11point(scores, labels) -> float:
    pr = _naive_pr(scores, labels)
    total = 0.0
    for i in range(11):
        t = i * 0.1  # the devkit's float thresholds: 3 * 0.1 > 0.3, so a recall of exactly 0.3 does not reach it
        total += max([p for p, r, _ in pr if r >= t], default=0.0)
    return total / 11


def naive_area(scores, labels) -> float:
    """Sum over positives of (1 / #positives) x the best precision at that rank or deeper."""
    pr = _naive_pr(scores, labels)
    n_pos = sum(1 for *_, pos in pr if pos)
    return sum(max(p for p, _, _ in pr[k:]) for k, (_, _, pos) in enumerate(pr) if pos) / n_pos


def test_ap_hand_built_and_against_naive_reference():
    scores, labels = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, -1, 0]
    # ranks without the difficult image: + - + -  -> precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1
    assert ap_area(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ap_11point(scores, labels) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # the difficult image's score does not matter
    assert ap_area([0.9, 0.8, 0.7, 5.0, 0.5], labels) == ap_area(scores, labels)
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        lab = rng.choice([1, 0, 0, -1], size=n)
        lab[0] = 1
        sc = rng.normal(size=n) + lab
        assert ap_11point(sc, lab) == pytest.approx(naive_11point(sc, lab), abs=1e-12)
        assert ap_area(sc, lab) == pytest.approx(naive_area(sc, lab), abs=1e-12)
    with pytest.raises(ValueError, match="no positive"):
        ap_area([0.1, 0.2], [0, -1])


def test_svm_protocol_separable_and_chance_classes():
    """Class 0 is linearly separable in the features (AP 100); class 1 is pure noise (AP far from 100)."""
    rng = np.random.default_rng(0)
    n, d = 120, 16
    x = rng.normal(size=(2 * n, d))
    y = np.zeros((2 * n, 2), dtype=np.int8)
    y[:, 0] = x[:, 0] > 0.3
    x[:, 0] += np.where(y[:, 0] == 1, 1.0, -1.0)  # a margin of 2 along the first axis
    y[:, 1] = rng.random(2 * n) < 0.3
    y[::7, 0] = -1  # difficult: ignored
    res = voc07_svm(x[:n], y[:n], x[n:], y[n:], costs=(0.01, 1.0), folds=3, classes=("sep", "noise"))
    assert res["per_class"]["sep"]["ap"] > 99 and res["per_class"]["sep"]["ap_area"] > 99
    assert res["per_class"]["noise"]["ap"] < 70
    assert res["map"] == pytest.approx((res["per_class"]["sep"]["ap"] + res["per_class"]["noise"]["ap"]) / 2)
    assert set(res["per_class"]["sep"]["cv_ap"]) == {"0.01", "1.0"}


@pytest.mark.slow
def test_svm_in_parallel_equals_serial():
    """--jobs 2 trains the classes in joblib worker processes (their start-up makes this test slow)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(90, 8)), (rng.random((90, 2)) < 0.4).astype(np.int8)
    small = (x[:60], y[:60], x[60:], y[60:])
    one = voc07_svm(*small, costs=(1.0,), folds=2, classes=("a", "b"))
    assert voc07_svm(*small, costs=(1.0,), folds=2, classes=("a", "b"), jobs=2) == one


def make_voc(root, n_trainval: int = 12, n_test: int = 8) -> str:
    """A tiny VOC2007 layout: coloured JPEGs and per-class 1/0/-1 lists (class c positive on every third image)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "ImageSets", "Main"))
    splits = {"trainval": [f"{i:06d}" for i in range(n_trainval)],
              "test": [f"{i:06d}" for i in range(n_trainval, n_trainval + n_test)]}
    for ids in splits.values():
        for i in ids:
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                os.path.join(root, "JPEGImages", f"{i}.jpg"))
    for c, cls in enumerate(VOC_CLASSES):
        for split, ids in splits.items():
            with open(os.path.join(root, "ImageSets", "Main", f"{cls}_{split}.txt"), "w") as f:
                for k, i in enumerate(ids):
                    label = 1 if (k + c) % 3 == 0 else (-1 if (k + c) % 5 == 1 else 0)
                    f.write(f"{i} {label:2d}\n")
    return str(root)


def test_reader_errors_name_the_problem(tmp_path):
    root = make_voc(tmp_path / "voc")
    ids, labels = read_voc_split(root, "trainval")
    assert len(ids) == 12 and labels.shape == (12, 20) and set(np.unique(labels)) == {-1, 0, 1}
    with pytest.raises(ConfigError, match="no ImageSets/Main"):
        read_voc_split(str(tmp_path), "trainval")
    main = os.path.join(root, "ImageSets", "Main")
    os.rename(os.path.join(main, "cow_test.txt"), os.path.join(main, "cow_test.bak"))
    with pytest.raises(ConfigError, match="missing class file .*cow_test.txt"):
        read_voc_split(root, "test")
    with open(os.path.join(main, "cow_test.txt"), "w") as f:
        f.write("000012 1\n000013 2\n")
    with pytest.raises(ConfigError, match=r"cow_test.txt:2: expected"):
        read_voc_split(root, "test")
    with open(os.path.join(main, "cow_test.txt"), "w") as f:
        f.write("000012 1\n")
    with pytest.raises(ConfigError, match="lists other images"):
        read_voc_split(root, "test")
    os.remove(os.path.join(root, "JPEGImages", "000003.jpg"))
    with pytest.raises(ConfigError, match="missing from .*JPEGImages, e.g. 000003.jpg"):
        read_voc_split(root, "trainval")


@pytest.mark.slow
def test_cli_end_to_end_with_cache(tiny_ckpt, tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    out = str(tmp_path / "voc07.json")
    args = ["voc07", "--checkpoint", tiny_ckpt, "--voc-dir", root, "--folds", "2", "--costs", "0.1", "1",
            "--out", out, "--cache-dir", str(tmp_path / "cache")]
    assert eval_cli.main(args) == 0
    assert "mAP (VOC07 11-point)" in capsys.readouterr().out
    with open(out) as f:
        res = json.load(f)
    assert set(res["per_class"]) == set(VOC_CLASSES) and res["train_images"] == 12 and res["test_images"] == 8
    assert 0 <= res["map"] <= 100 and res["map"] == pytest.approx(np.mean([r["ap"] for r in res["per_class"].values()]))
    assert len(os.listdir(tmp_path / "cache")) == 2  # trainval and test features
    assert eval_cli.main(args) == 0
    assert "[cache] voc07_trainval: reusing" in capsys.readouterr().out
    with open(out) as f:
        assert json.load(f)["map"] == res["map"]  # same features from the cache, same SVMs
    assert eval_cli.main([*args[:4], str(tmp_path / "nowhere"), *args[5:]]) == 2
    assert "no ImageSets/Main" in capsys.readouterr().err


def test_demo_builder_writes_a_readable_multilabel_layout(tiny_folder, tmp_path):
    from torchvision.datasets import ImageFolder

    from evaluation.voc_demo import build, synthetic_label

    out = str(tmp_path / "voc_demo")
    counts = build(os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val"), out)
    ids, labels = read_voc_split(out, "trainval")
    classes = np.asarray(ImageFolder(os.path.join(tiny_folder, "train")).targets)
    k = int(classes.max()) + 1
    assert len(ids) == counts["trainval"] == len(classes)
    assert np.array_equal(labels[:, :k] == 1, classes[:, None] == np.arange(k)[None, :])  # class j < K: folder class
    want = [[synthetic_label(j, y, k, n) for j in range(20)] for n, y in enumerate(classes)]
    assert np.array_equal(labels, np.asarray(want))
    assert ((labels == 1).sum(1) >= 1).all() and (labels == -1).any()
    assert [synthetic_label(j, 4, 10, 1) for j in range(20)].count(1) == 3  # demo data: 3 positive classes per image
    assert len(read_voc_split(out, "test")[0]) == counts["test"]
    with pytest.raises(FileExistsError):
        build(os.path.join(tiny_folder, "train"), os.path.join(tiny_folder, "val"), out)
