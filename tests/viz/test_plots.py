"""Training-curve PNGs: the file is a real PNG and every drawn line is exactly its metrics.jsonl series."""

import json
import math
import struct

import pytest
from PIL import Image

from engine.plots import main, plot_run_safely, plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=200, max_side=4000):
    """Valid PNG (magic + IHDR width/height read from the header, then decoded by Pillow) of a sane size."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (w, h)
        # not a blank canvas: the curves put many distinct colours on it
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    return w, h


def _write_run(run_dir, with_knn=True):
    rows = []
    for step in range(10, 101, 10):
        row = {"step": step, "loss": 5.0 / math.sqrt(step), "lr": 1e-3 * step / 100, "wd": 0.04,
               "images_per_s": 100.0 + step, "data_wait": 0.1, "epoch": step / 40}
        if step % 20 == 0:  # the collapse monitor logs only at some steps
            row.update(feat_rank=10.0 + step / 10, feat_std=0.5 + step / 1000)
        if step >= 50:
            row["probe_top1"] = float(step / 2)
        rows.append(row)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 11')  # a killed writer's tail is skipped
    if with_knn:
        (run_dir / "knn.json").write_text(json.dumps({"k20": {"top1": 42.5, "top5": 80.0}, "seconds": 1.0}))
    return rows


def _lines(fig):
    """{label: (xs, ys)} of every Line2D in the figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            xs, ys = line.get_data()
            out[line.get_label()] = ([float(x) for x in xs], [float(y) for y in ys])
    return out


def test_curves_match_jsonl(tmp_path):
    rows = _write_run(tmp_path)
    fig = plot_training_curves(str(tmp_path))
    assert_png(tmp_path / "curves.png")
    lines = _lines(fig)
    for key in ("loss", "lr", "images_per_s", "feat_rank", "feat_std", "probe_top1"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert lines[key] == ([float(s) for s, _ in want], [float(v) for _, v in want]), key
    assert lines["knn k=20"] == ([100.0], [42.5])  # the final kNN as a point at the last step
    assert "wd" not in lines and "data_wait" not in lines
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "learning rate", "images/s", "feature effective rank", "std of L2-normalised features",
                      "accuracy (top-1)"]
    assert fig.axes[1].get_yscale() == "log"


def test_curves_skip_missing_panels(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                    for s in (1, 2, 3)))
    fig = plot_training_curves(str(tmp_path), str(tmp_path / "c.png"))
    assert [ax.get_title() for ax in fig.axes] == ["loss"]
    assert_png(tmp_path / "c.png", min_side=150)


def test_cli_and_end_of_run_hook(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2  # no metrics.jsonl: a clear error, exit 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    assert plot_run_safely(str(tmp_path)) is None  # the end-of-run hook only warns
    assert "WARNING: could not draw" in capsys.readouterr().err
    _write_run(tmp_path, with_knn=False)
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 0
    assert_png(tmp_path / "x.png")
    assert plot_run_safely(str(tmp_path)) == str(tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


@pytest.mark.parametrize("bad", ['{"loss": 1.0}\n', "not json\n"])
def test_no_plottable_rows(tmp_path, bad):
    (tmp_path / "metrics.jsonl").write_text(bad)
    with pytest.raises(ValueError, match="no plottable rows"):
        plot_training_curves(str(tmp_path))
