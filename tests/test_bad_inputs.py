"""Bad inputs of train.py, eval.py and convert_dataset.py: refused before any work with one message naming the key,
flag or file (exit code 2; convert_dataset.py's documented 1 for a conversion error), or handled and reported.

Each row of ``CASES`` is (id, tool, argv builder, expected message fragments, exit code). The builders take a
scratch folder and return argv; ``main(argv)`` of the tool runs in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

import convert_dataset
import eval as eval_cli
import train as train_cli
from tests.conftest import TINY_OVERRIDES, make_image_folder

TOOLS = {"train": train_cli, "eval": eval_cli, "convert": convert_dataset}


def run_main(tool: str, argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` of ``tool`` in-process -> (exit code, stdout + stderr); argparse's SystemExit is an exit code."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = TOOLS[tool].main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue()


# ------------------------------------------------------------------------------------------------ argv builders


def _yaml(d: Path, text: str) -> str:
    (d / "exp.yaml").write_text(text)
    return str(d / "exp.yaml")


def _binary(d: Path) -> str:
    (d / "weights.yaml").write_bytes(bytes(range(256)) * 4)
    return str(d / "weights.yaml")


def _src(d: Path) -> str:
    return make_image_folder(str(d / "src"), classes=2, per_class=2, size=16)


def _class_index(d: Path, mapping: dict) -> str:
    (d / "classes.json").write_text(json.dumps({"class_to_idx": mapping}))
    return str(d / "classes.json")


def _convert(d: Path, *extra: str) -> list[str]:
    return ["--src", _src(d), "--out", str(d / "out" / "x.beton"), "-q", "-j", "1", *extra]


def _knn(*extra: str) -> list[str]:
    return ["knn", "--checkpoint", "runs/x", "--train-dir", "a", "--val-dir", "b", *extra]


CASES = [
    ("ckpt_every=-1", "train", lambda d: ["--method", "dino", "train.ckpt_every=-1"],
     ["train.ckpt_every: must be >= 1, got -1"], 2),
    ("ckpt_every=0", "train", lambda d: ["--method", "dino", "train.ckpt_every=0"],
     ["train.ckpt_every: must be >= 1, got 0"], 2),
    ("steps_per_epoch=-5", "train", lambda d: ["--method", "dino", "train.steps_per_epoch=-5"],
     ["train.steps_per_epoch: must be >= 0, got -5"], 2),
    ("knn_k=0", "train", lambda d: ["--method", "dino", "eval.knn_k=0"], ["eval.knn_k: must be >= 1, got 0"], 2),
    ("knn_k=-3", "train", lambda d: ["--method", "dino", "eval.knn_k=-3"], ["eval.knn_k: must be >= 1, got -3"], 2),
    ("knn_t=nan", "train", lambda d: ["--method", "ressl", "eval.knn_t=.nan"], ["eval.knn_t", "finite", "nan"], 2),
    ("views[1].size", "train", lambda d: ["--method", "dino", "data.views=[{count: 2}, {role: local, size: 4}]"],
     ["data.views[1].size: must be >= 8, got 4"], 2),
    ("ssl.groups=0", "train", lambda d: ["--method", "cw_rgp", "ssl.groups=0"], ["ssl.groups: must be >= 1"], 2),
    ("yaml duplicated key", "train",
     lambda d: ["--method", "dino", "--config", _yaml(d, "optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.5\n")],
     ["exp.yaml", "duplicated key 'lr' on line 4", "first on line 2"], 2),
    ("yaml duplicated top key", "train",
     lambda d: ["--method", "dino", "--config", _yaml(d, "optim: {lr: 0.1}\ntrain: {epochs: 2}\noptim: {}\n")],
     ["exp.yaml", "duplicated key 'optim' on line 3"], 2),
    ("override duplicated key", "train", lambda d: ["--method", "dino", "data.views=[{size: 32, size: 64}]"],
     ["duplicated key 'size'"], 2),
    ("config is a directory", "train", lambda d: ["--method", "dino", "--config", str(d)],
     ["is a directory; pass a YAML file"], 2),
    ("config is binary", "train", lambda d: ["--method", "dino", "--config", _binary(d)],
     ["weights.yaml", "not a text file"], 2),
    ("train --steps 0", "train", lambda d: ["--method", "dino", "--benchmark", "--steps", "0"],
     ["argument --steps: must be >= 1, got 0"], 2),
    ("knn --k 0", "eval", lambda d: _knn("--k", "20", "0"), ["argument --k: must be >= 1, got 0"], 2),
    ("knn --k -5", "eval", lambda d: _knn("--k", "-5"), ["argument --k: must be >= 1, got -5"], 2),
    ("knn --temperature 0", "eval", lambda d: _knn("--temperature", "0"),
     ["argument --temperature: must be > 0, got 0"], 2),
    ("knn --size 4", "eval", lambda d: _knn("--size", "4"), ["argument --size: must be 0 or >= 8, got 4"], 2),
    ("linear --num-classes 0", "eval",
     lambda d: ["linear", "--checkpoint", "x", "--data", "a", "--val-data", "b", "--num-classes", "0"],
     ["argument --num-classes: must be >= 1"], 2),
    ("convert --jpeg-quality 0", "convert", lambda d: _convert(d, "--jpeg-quality", "0"),
     ["argument --jpeg-quality: must be in [1, 100], got 0"], 2),
    ("convert --shard-mb -1", "convert", lambda d: _convert(d, "--shard-mb", "-1"),
     ["argument --shard-mb: must be > 0"], 2),
    ("class index shares an index", "convert",
     lambda d: _convert(d, "--class-index", _class_index(d, {"class0": 0, "class1": 0})),
     ["classes.json", "'class0', 'class1' share index 0", "own index"], 1),
    ("class index negative", "convert",
     lambda d: _convert(d, "--class-index", _class_index(d, {"class0": 0, "class1": -1})),
     ["classes.json", "negative index for 'class1' (-1)"], 1),
    ("class index bool", "convert",
     lambda d: _convert(d, "--class-index", _class_index(d, {"class0": 0, "class1": True})),
     ["classes.json", "expected {class_name: int}"], 1),
    ("out in a folder nobody may write (/sys)", "convert", lambda d: _convert(d)[:2] + ["--out", "/sys/x/y.beton"],
     ["cannot write to /sys (Permission denied)"], 1),
    ("out under a file", "convert",
     lambda d: ["--src", _src(d), "--out", str(Path(_src(d)) / "class0" / "000.jpg" / "x.beton"), "-q"],
     ["000.jpg is a file, not a folder"], 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name(case, tmp_path):
    _, tool, build, fragments, code = case
    rc, out = run_main(tool, build(tmp_path))
    assert rc == code, out
    assert "Traceback" not in out
    for fragment in fragments:
        assert fragment in out, (fragment, out)


def test_read_only_output_folder(tmp_path, monkeypatch):
    """A real read-only folder when not root; root writes anywhere, so the refusal of the OS is simulated."""
    import tempfile

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    else:
        real = tempfile.mkstemp

        def refuse(*a, dir=None, **k):  # noqa: A002 - mkstemp's own keyword
            if str(dir).startswith(str(ro)):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    rc, out = run_main("convert", ["--src", _src(tmp_path), "--out", str(ro / "sub" / "x.beton"), "-q", "-j", "1"])
    assert rc == 1 and "Traceback" not in out
    assert f"cannot write to {ro} (Permission denied)" in out and not (ro / "sub").exists(), out


# ------------------------------------------------------------------------------------------------ converted + reported


@pytest.fixture
def awkward_tree(tmp_path: Path) -> Path:
    """Class folders a, b holding one good image each, plus names and links that must not reach the outputs."""
    root = Path(make_image_folder(str(tmp_path / "src"), classes=2, per_class=1, size=16))
    a, b = root / "class0", root / "class1"
    good = (a / "000.jpg").read_bytes()
    with open(os.fsencode(a) + b"/caf\xe9.jpg", "wb") as f:  # a latin-1 byte: not UTF-8
        f.write(good)
    (a / "tab\there.jpg").write_bytes(good)
    (a / "new\nline.jpg").write_bytes(good)
    (a / "loop").symlink_to(a)  # class0/loop -> class0: would recurse forever
    (a / "up").symlink_to(root)  # class0/up -> src: a loop through the split's root
    (a / "sib").symlink_to(b)  # class0/sib -> class1: would label class1's image as class0
    (a / "other.jpg").symlink_to(b / "000.jpg")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.jpg").write_bytes(good)
    (a / "ext").symlink_to(tmp_path / "outside")
    return root


def test_awkward_names_and_links_are_skipped_and_reported(awkward_tree, tmp_path):
    rc, out = run_main("convert", ["--src", str(awkward_tree), "--out", str(tmp_path / "o"), "--format", "both", "-q",
                                   "-j", "1"])
    assert rc == 0 and "Traceback" not in out, out
    rows = [line.split("\t") for line in (tmp_path / "o/dali/src/samples.tsv").read_text().splitlines()[1:]]
    assert sorted((r[2], r[1]) for r in rows) == [("class0/000.jpg", "0"), ("class1/000.jpg", "1")]
    assert (tmp_path / "o/ffcv/src.samples.tsv").read_text().splitlines()[1:] == \
        (tmp_path / "o/dali/src/samples.tsv").read_text().splitlines()[1:]
    report = json.loads((tmp_path / "o/dali/src.report.json").read_text())
    reasons = {e["path"]: e["reason"] for e in report["skipped_inputs"]}
    assert "not valid UTF-8" in reasons["class0/caf\\xe9.jpg"]
    for name in ("class0/tab\there.jpg", "class0/new\nline.jpg"):
        assert "tab or line break" in reasons[name]
    assert "symlink loop" in reasons["class0/loop"]
    assert "symlink loop" in reasons["class0/up"]
    assert "another folder of --src (class1)" in reasons["class0/sib"]
    assert "another folder of --src (class1/000.jpg)" in reasons["class0/other.jpg"]
    assert "--follow-links" in reasons["class0/ext"]


def test_follow_links_includes_outside_folder_only(awkward_tree, tmp_path):
    rc, out = run_main("convert", ["--src", str(awkward_tree), "--out", str(tmp_path / "f.beton"), "-q", "-j", "1",
                                   "--follow-links"])
    assert rc == 0, out
    rows = sorted(line.split("\t")[2] for line in (tmp_path / "f.samples.tsv").read_text().splitlines()[1:])
    assert rows == ["class0/000.jpg", "class0/ext/o.jpg", "class1/000.jpg"]


def test_val_split_missing_a_class_warns(tmp_path):
    src = _src(tmp_path)
    index = _class_index(tmp_path, {"class0": 0, "class1": 1, "class2": 2})
    rc, out = run_main("convert", ["--src", src, "--out", str(tmp_path / "v.beton"), "-q", "-j", "1",
                                   "--class-index", index])
    assert rc == 0, out
    assert "warning: 1 of the 3 classes of --class-index" in out and "'class2'" in out and "no images" in out


# ------------------------------------------------------------------------------------------------ damaged .beton


def _zeroed_beton(tmp_path: Path) -> str:
    import pipeline.load.ffcv_compat  # noqa: F401, I001  (first: checks ffcv's version, keeps torch's threads)
    from ffcv.reader import Reader

    out = tmp_path / "z.beton"
    assert run_main("convert", ["--src", make_image_folder(str(tmp_path / "t"), classes=2, per_class=6, size=32),
                                "--out", str(out), "-q", "-j", "1"])[0] == 0
    table = Reader(str(out)).alloc_table
    start, stop = int(table["ptr"][3]), int(table["ptr"][6])  # samples 3, 4, 5 zeroed from their first byte
    with open(out, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * (stop - start))
    return str(out)


def test_zeroed_beton_is_refused_before_the_first_step(tmp_path):
    import pipeline.load.ffcv_compat  # noqa: F401, I001  (first: checks ffcv's version, keeps torch's threads)
    from ffcv.reader import Reader
    from pipeline.load.ffcv_loader import corrupt_jpeg_samples

    path = _zeroed_beton(tmp_path)
    assert corrupt_jpeg_samples(Reader(path)).tolist() == [3, 4, 5]
    argv = ["--method", "dino", *TINY_OVERRIDES, "data.loader=ffcv", f"data.train_path={path}",
            f"train.out_dir={tmp_path / 'run'}", "train.epochs=1"]
    rc, out = run_main("train", argv)
    assert rc == 2 and "Traceback" not in out, out
    line = [x for x in out.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and path in line[0] and "3 of 12 stored image(s) are corrupt" in line[0], out
    assert "re-convert" in line[0] and not list((tmp_path / "run").glob("ckpt_step*.pt"))


def test_undecodable_batch_is_one_line(tmp_path):
    from pipeline.load.ffcv_loader import split_views_checked
    from runtime.config_loader import ConfigError

    sizes, total = [8], 3 * 8 * 8
    flat = np.zeros(4 * (total + 1), dtype=np.uint8)  # split_views' layout: view-major pixels, then B status bytes
    flat[4 * total + 1: 4 * total + 3] = 1  # samples 1 and 2 of the batch failed to decode
    images = flat.reshape(4, total + 1)
    with pytest.raises(ConfigError, match=r"b\.beton: 2 image\(s\) of this batch are corrupt \(e\.g\. sample "
                                          r"indices 11, 12\).*re-convert"):
        split_views_checked(images, sizes, np.arange(10, 14), "b.beton")
