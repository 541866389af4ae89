"""eval.py tsne: the PNG is valid, each class's points are the t-SNE coordinates of that class, and the features are
the ones eval.py knn cached."""

import json
import os

import numpy as np
import torch

import eval as eval_cli
from evaluation.tsne import plot_map, subsample, tsne_map
from tests.viz.test_plots import assert_png


def _clusters(per_class=20, classes=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    return centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def test_map_separates_clusters_and_plots_them(tmp_path):
    x, y = _clusters()
    xy, used = tsne_map(x, perplexity=30.0, seed=0)
    assert xy.shape == (80, 2) and used == 26.333333333333332  # capped at (N - 1) / 3
    labels = y.numpy()
    # well separated input clusters stay separated: every point's 2-D nearest neighbour has its class
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1) + np.eye(80) * 1e18
    assert (labels[d.argmin(1)] == labels).all()
    names = ["a", "b", "c", "d"]
    fig = plot_map(xy, labels, names, "test", str(tmp_path / "m.png"))
    assert_png(tmp_path / "m.png")
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.collections] == names
    for c, coll in enumerate(ax.collections):
        np.testing.assert_allclose(coll.get_offsets(), xy[labels == c])
    again, _ = tsne_map(x, perplexity=30.0, seed=0)
    np.testing.assert_allclose(again, xy)  # seeded


def test_subsample_is_class_proportional_and_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = subsample(labels, 50, seed=3)
    assert np.bincount(labels[idx]).tolist() == [30, 15, 5]
    assert (idx == subsample(labels, 50, seed=3)).all() and not (idx == subsample(labels, 50, seed=4)).all()
    assert len(subsample(labels, 0, 0)) == 100


def test_cli_reuses_knn_features(tiny_ckpt, tiny_folder, tmp_path, capsys):
    val = os.path.join(tiny_folder, "val")
    cache = str(tmp_path / "cache")
    assert eval_cli.main(["knn", "--checkpoint", tiny_ckpt, "--train-dir", os.path.join(tiny_folder, "train"),
                          "--val-dir", val, "--k", "3", "--cache-dir", cache, "--device", "cpu"]) == 0
    out = str(tmp_path / "t.png")
    assert eval_cli.main(["tsne", "--checkpoint", tiny_ckpt, "--val-dir", val, "--out", out, "--cache-dir", cache,
                          "--device", "cpu"]) == 0
    assert "[cache] val: reusing" in capsys.readouterr().out
    assert_png(out)
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["images"] == 8 and res["classes"] == 2 and res["features_cached"] is True
    assert 0.0 <= res["trustworthiness"] <= 1.0 and res["trustworthiness_k"] == 3 and res["perplexity"] == 7 / 3


def test_cli_bad_input_exits_2(tiny_ckpt, tiny_folder, tmp_path, capsys):
    val = os.path.join(tiny_folder, "val")
    assert eval_cli.main(["tsne", "--checkpoint", tiny_ckpt, "--val-dir", val, "--out", str(tmp_path / "t.jpg"),
                          "--no-cache"]) == 2
    assert "must end in .png" in capsys.readouterr().err
    assert eval_cli.main(["tsne", "--checkpoint", tiny_ckpt, "--val-dir", str(tmp_path / "nope"), "--no-cache"]) == 2
    assert "--val-dir" in capsys.readouterr().err
