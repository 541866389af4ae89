"""train.py --find-batch-size / --find-lr: the search and the suggestion rules, and real runs on the tiny recipe that
leave no checkpoint behind."""

import json
import math
import os

import numpy as np
import pytest
import yaml

import train
from engine import lr_finder, scratch_run
from engine.batch_finder import search_batch
from engine.config import load_config
from engine.lr_finder import smooth, suggest, sweep_lrs
from tests.conftest import TINY_OVERRIDES
from tests.viz.test_plots import assert_png


@pytest.mark.parametrize("limit,start,max_batch", [(100, 8, 4096), (100, 256, 4096), (8, 64, 512), (7, 8, 64),
                                                   (5000, 64, 512), (64, 64, 64)])
def test_search_batch_finds_the_largest_fitting_multiple(limit, start, max_batch):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    best = search_batch(fits, start, max_batch, 8)
    want = min(limit, max_batch) // 8 * 8
    assert best == want, calls
    assert all(b % 8 == 0 and 8 <= b <= max_batch for b in calls)
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(max_batch / 8)) + 2  # logarithmic


def test_smooth_is_the_bias_corrected_ema():
    x = [3.0, 1.0, 2.0, 5.0]
    want, m = [], 0.0
    for i, v in enumerate(x):
        m = 0.8 * m + 0.2 * v
        want.append(m / (1 - 0.8 ** (i + 1)))
    assert smooth(x, 0.8) == pytest.approx(want, rel=1e-12)
    assert smooth(x, 0.8)[0] == 3.0  # no pull towards 0 at the start


def test_suggest_finds_steepest_descent_before_the_minimum():
    lrs = sweep_lrs(1e-6, 1.0, 121)
    t = np.log10(lrs)
    loss = 2.0 - np.tanh(2 * (t + 3.0)) + np.where(t > -1, 30 * (t + 1) ** 2, 0.0)  # steepest at 1e-3, min near 1e-1
    steep, at_min = suggest(list(lrs), list(loss))
    assert steep == pytest.approx(1e-3, rel=0.13) and 0.05 < at_min < 0.2
    assert np.allclose(np.diff(np.log(lrs)), np.log(1e6) / 120)  # exponential sweep
    with pytest.raises(Exception, match="lr_min < lr_max"):
        sweep_lrs(1.0, 0.1, 50)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny steps on a shared machine: one intra-op thread here and in the spawned probe processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


def _args(tiny_folder, tmp_path, *extra):
    return ["--method", "dino", *extra, *TINY_OVERRIDES, "model.precision=fp32",
            f"data.train_path={tiny_folder}/train", f"train.out_dir={tmp_path / 'run'}"]


@pytest.mark.slow
def test_find_lr_applies_the_sweep_and_leaves_no_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys):
    seen = []
    real = scratch_run.training_steps

    def spy(trainer, n):
        for step, logs in real(trainer, n):
            seen.append(trainer.optimizer.param_groups[0]["lr"] / trainer.optimizer.param_groups[0].get("lr_scale", 1))
            yield step, logs

    monkeypatch.setattr(lr_finder, "training_steps", spy)
    out, written = tmp_path / "finders", tmp_path / "lr.yaml"
    argv = _args(tiny_folder, tmp_path, "--find-lr", "--lr-steps", "12", "--lr-min", "1e-5", "--lr-max", "1e-1",
                 "--finder-out", str(out), "--write-config", str(written))
    assert train.main(argv) == 0
    res = json.loads((out / "lr_find.json").read_text())
    assert res["lrs"] == pytest.approx(list(sweep_lrs(1e-5, 1e-1, 12))[:res["steps_run"]])
    assert seen == pytest.approx(res["lrs"])  # the optimizer really stepped with the sweep's lrs
    assert res["suggested_lr"] in res["lrs"] and all(math.isfinite(v) for v in res["losses"])
    assert res["smoothed"] == pytest.approx(smooth(res["losses"], 0.9))
    assert_png(out / "lr_find.png")
    assert not (tmp_path / "run").exists()  # no checkpoint, config.yaml or metrics.jsonl in train.out_dir
    cfg_lr = yaml.safe_load(written.read_text())["optim"]["lr"]
    assert cfg_lr == pytest.approx(res["suggested_lr"] / (8 / 256))  # undoes linear lr scaling at batch 8
    assert "optim.lr=" in capsys.readouterr().out
    assert train.main(argv) == 2  # never overwrites the written config
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_find_batch_size_against_a_budget(tiny_folder, tmp_path, capsys):
    out = tmp_path / "finders"
    common = ["--find-batch-size", "--max-batch-size", "16", "--finder-out", str(out)]
    assert train.main(_args(tiny_folder, tmp_path, *common, "--memory-budget-gb", "64",
                            "--write-config", str(tmp_path / "bs.yaml"))) == 0
    res = json.loads((out / "batch_size.json").read_text())
    assert res["batch_size"] == 16 and [p["batch"] for p in res["probes"]] == [8, 16]
    assert all(p["fits"] and 0.2 < p["peak_gib"] < 64 for p in res["probes"])  # python + torch alone is > 200 MiB
    assert yaml.safe_load((tmp_path / "bs.yaml").read_text()) == {"data": {"batch_size": 16}}
    cfg = load_config("dino", [str(tmp_path / "bs.yaml")], [])
    assert cfg.data.batch_size == 16
    # a budget below what Python + torch need: the watchdog stops the first probe, a clear error, exit 2
    assert train.main(_args(tiny_folder, tmp_path, *common, "--memory-budget-gb", "0.05")) == 2
    assert "not even batch 8 fits" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert os.listdir(out) == ["batch_size.json"]


def test_batch_finder_needs_a_budget_on_cpu(tiny_folder, tmp_path, capsys):
    assert train.main(_args(tiny_folder, tmp_path, "--find-batch-size", "train.device=cpu")) == 2
    assert "--memory-budget-gb: required on the CPU" in capsys.readouterr().err
