"""Collapse guard: teacher entropies against float64 formulas, the guard on synthetic statistic streams, and the
trainer on runs forced to collapse (DINO with teacher temperature 1.0) and healthy ones."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import engine.knn_monitor as knn_monitor
import train as train_cli
from engine.collapse import CollapseError, CollapseGuard, distribution_entropies
from engine.config import load_config
from engine.trainer import Trainer
from evaluation.knn_backbone import knn_of_backbone
from evaluation.knn_eval import random_init_backbone
from runtime.checkpoint import list_checkpoints
from runtime.config_loader import ConfigError
from tests.conftest import TINY_OVERRIDES


def _naive_entropies(p: torch.Tensor) -> tuple[float, float]:
    """Mean row entropy and entropy of the mean row, over log K, written out in float64 Python loops."""
    rows = p.reshape(-1, p.shape[-1]).double().tolist()
    k = len(rows[0])
    h_rows = sum(-sum(q * math.log(q) for q in r if q > 0) for r in rows) / len(rows)
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(k)]
    h_mean = -sum(q * math.log(q) for q in mean if q > 0)
    return h_rows / math.log(k), h_mean / math.log(k)


def test_entropies_match_float64_formulas_and_the_collapse_extremes():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 12, 50, generator=g) * 3, dim=-1)  # (T, B, K) like DINO's teacher
    got = distribution_entropies(p)
    ref = _naive_entropies(p)
    assert float(got["teacher_entropy"]) == pytest.approx(ref[0], rel=1e-6)
    assert float(got["teacher_batch_entropy"]) == pytest.approx(ref[1], rel=1e-6)
    uniform = distribution_entropies(torch.full((16, 64), 1 / 64))
    assert float(uniform["teacher_entropy"]) == pytest.approx(1.0, abs=1e-6)  # uniform collapse
    same = torch.zeros(16, 64)
    same[:, 3] = 1
    onehot = distribution_entropies(same)  # every sample the same one-hot target: both entropies 0
    assert float(onehot["teacher_entropy"]) == 0.0 and float(onehot["teacher_batch_entropy"]) == 0.0
    spread = torch.eye(64)[:16]  # one-hot but each sample its own prototype: batch entropy log 16 / log 64
    assert float(distribution_entropies(spread)["teacher_batch_entropy"]) == pytest.approx(math.log(16) / math.log(64))


def _guard(patience=3, **kw):
    args = {"uniform_entropy": 0.97, "onehot_entropy": 0.05, "min_rank": 2.0, "min_std_ratio": 0.02, "knn_drop": 2.0,
            **kw}
    return CollapseGuard(patience, feat_dim=512, **args)


HEALTHY = {"teacher_entropy": 0.6, "teacher_batch_entropy": 0.7, "feat_rank": 30.0, "feat_std": 0.02, "knn_gain": -1.5}


@pytest.mark.parametrize(("kind", "bad"), [
    ("uniform", {"teacher_entropy": 0.995}),
    ("one_hot", {"teacher_batch_entropy": 0.01}),
    ("dimensional", {"feat_rank": 1.3}),
    ("constant", {"feat_std": 1e-4 / math.sqrt(512)}),
    ("information", {"knn_gain": -2.0}),
])
def test_guard_trips_once_after_patience_with_the_right_kind(kind, bad):
    guard = _guard()
    assert guard.observe(10, HEALTHY) == [] and guard.suspect_since is None
    assert guard.observe(20, {**HEALTHY, **bad}) == [] and guard.suspect_since == 20
    assert guard.observe(30, HEALTHY) == [] and guard.suspect_since is None  # a recovered streak starts over
    events = [guard.observe(s, {**HEALTHY, **bad}) for s in (40, 50, 60, 70)]
    assert events[0] == [] and events[1] == [] and [e.kind for e in events[2]] == [kind] and events[3] == []
    e = events[2][0]
    assert (e.step, e.since) == (60, 40) and e.row()["kind"] == kind
    assert guard.suspect_since == 40


def test_guard_ignores_missing_and_disabled_statistics():
    guard = _guard(patience=1, uniform_entropy=None)
    assert guard.observe(1, {"feat_rank": 30.0, "feat_std": 0.02}) == []  # a method without a teacher
    assert guard.observe(2, {**HEALTHY, "teacher_entropy": 1.0}) == []  # criterion switched off
    assert guard.observe(3, {**HEALTHY, "feat_rank": float("nan")}) == []  # NaN is the finite-loss check's job


def test_a_statistic_missing_from_a_row_keeps_its_streak():
    # the kNN gain arrives at epoch ends, between log rows that do not carry it: those rows neither extend nor break
    # its streak, while a row that carries a healthy value does break it
    guard = _guard(patience=2)
    rows = [{"knn_gain": -3.0}, {"feat_rank": 30.0}, {"knn_gain": 0.5}, {"knn_gain": -3.0}, {"feat_rank": 30.0},
            {"knn_gain": -2.5}]
    kinds = [[e.kind for e in guard.observe(step, row)] for step, row in enumerate(rows, start=1)]
    assert kinds == [[], [], [], [], [], ["information"]]
    assert guard.streak == {"information": (4, 2)}


@pytest.mark.parametrize(("key", "value"), [("collapse_patience", 0), ("collapse_uniform_entropy", 1.5),
                                            ("collapse_onehot_entropy", 1.0), ("collapse_min_rank", -1),
                                            ("collapse_min_std_ratio", -0.1),
                                            ("collapse_knn_drop", -1), ("knn_every", -1)])
def test_bad_guard_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        load_config("dino", [], [f"train.{key}={value}"])


def _tiny(tiny_folder, tmp_path, *extra):
    return load_config("dino", [], TINY_OVERRIDES + [
        f"data.train_path={tiny_folder}/train", f"train.out_dir={tmp_path}", "train.log_every=1",
        "train.collapse_patience=2", "ssl.warmup_teacher_temp_epochs=0", *extra])


def _events(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == "collapse"]


@pytest.mark.slow
def test_teacher_temperature_one_trips_uniform_collapse_and_a_healthy_run_does_not(tiny_folder, tmp_path, capsys):
    broken = _tiny(tiny_folder, tmp_path / "broken", "train.epochs=1", "train.steps_per_epoch=4",
                   "ssl.warmup_teacher_temp=1.0", "ssl.teacher_temp=1.0")
    history = Trainer(broken).fit().history
    assert all(h["teacher_entropy"] > 0.99 for h in history)
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("[collapse] WARNING") == 1 and "uniform collapse" in text and "teacher temperature" in text
    assert [(e["kind"], e["step"], e["since"]) for e in _events(tmp_path / "broken")] == [("uniform", 2, 1)]

    healthy = _tiny(tiny_folder, tmp_path / "healthy", "train.epochs=1", "train.steps_per_epoch=4",
                    "ssl.warmup_teacher_temp=0.04", "ssl.teacher_temp=0.04")
    history = Trainer(healthy).fit().history
    assert all(h["teacher_entropy"] < 0.9 and h["teacher_batch_entropy"] > 0.3 for h in history), history
    assert "[collapse]" not in capsys.readouterr().err and _events(tmp_path / "healthy") == []


@pytest.mark.slow
def test_stop_on_collapse_keeps_the_checkpoint_from_before_the_collapse(tiny_folder, tmp_path):
    # epoch 0 at teacher temperature 0.04 (healthy), from epoch 1 on at 1.0: collapse begins at step 4
    cfg = _tiny(tiny_folder, tmp_path, "train.epochs=3", "train.steps_per_epoch=3", "train.ckpt_every=1",
                "train.keep_last=10", "train.stop_on_collapse=true", "ssl.warmup_teacher_temp=0.04",
                "ssl.teacher_temp=1.0", "ssl.warmup_teacher_temp_epochs=2")
    with pytest.raises(CollapseError, match=r"uniform collapse at step 5 \(since step 4\).*ckpt_step0*3"):
        Trainer(cfg).fit()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 2, 1]
    assert [(e["kind"], e["since"]) for e in _events(tmp_path)] == [("uniform", 4)]


@pytest.mark.slow
def test_train_cli_exits_2_on_collapse_with_stop_on_collapse(tiny_folder, tmp_path, capsys):
    rc = train_cli.main(["--method", "dino", *TINY_OVERRIDES, f"data.train_path={tiny_folder}/train",
                         f"train.out_dir={tmp_path}", "train.epochs=1", "train.steps_per_epoch=3",
                         "train.collapse_patience=2", "train.stop_on_collapse=true", "ssl.warmup_teacher_temp=1.0",
                         "ssl.teacher_temp=1.0", "ssl.warmup_teacher_temp_epochs=0"])
    assert rc == 2
    assert "uniform collapse at step 2" in capsys.readouterr().err


def _mean_worker(rank, world_size, tmpdir):
    from engine.collapse import mean_over_ranks

    logs = {"loss": torch.tensor(float(rank)), "feat_rank": torch.tensor(10.0 + 4 * rank),
            "teacher_entropy": torch.tensor(0.5 + 0.5 * rank)}
    out = mean_over_ranks(logs)
    return {k: float(v) for k, v in out.items()}


def test_two_ranks_see_the_same_averaged_guard_statistics():
    from tests.dist_helpers import run_distributed

    r0, r1 = run_distributed(_mean_worker, 2)
    assert r0["feat_rank"] == r1["feat_rank"] == 12.0 and r0["teacher_entropy"] == r1["teacher_entropy"] == 0.75
    assert (r0["loss"], r1["loss"]) == (0.0, 1.0)  # only the guard's statistics are reduced


@pytest.mark.slow
def test_knn_every_logs_the_gain_over_the_init_and_reports_information_loss(tiny_folder, tmp_path, capsys,
                                                                         monkeypatch):
    # eval.features=student under a weight decay that wipes its conv weights (SGD, lr x wd = 1): its kNN on the tiny
    # set falls below the same backbone's at initialisation, measured before step 0 and kept across a resume
    extra = ("train.knn_every=1", "train.collapse_knn_drop=1", f"eval.train_dir={tiny_folder}/train",
             f"eval.val_dir={tiny_folder}/val", "eval.features=student", "optim.lr=1", "optim.lr_scaling=none",
             "optim.weight_decay=1", "optim.momentum=0", "optim.warmup_epochs=0", "optim.min_lr=1",
             "optim.clip_grad=0", "train.steps_per_epoch=3")
    first = Trainer(_tiny(tiny_folder, tmp_path, "train.epochs=1", *extra))
    init = knn_of_backbone(random_init_backbone(first.cfg, "student"), first.cfg, f"{tiny_folder}/train",
                           f"{tiny_folder}/val", torch.device("cpu"))["k20"]["top1"]
    rows = [h for h in first.fit().history if "knn_top1" in h]
    assert first.knn.init_top1 == pytest.approx(init)
    assert [r["step"] for r in rows] == [0, 3]
    assert rows[0] == {"step": 0, "knn_top1": pytest.approx(init), "knn_gain": 0}
    assert rows[1]["knn_gain"] == pytest.approx(rows[1]["knn_top1"] - init)
    resumed = Trainer(_tiny(tiny_folder, tmp_path, "train.epochs=3", "train.resume=auto", *extra))
    assert resumed.knn.init_top1 == pytest.approx(init)  # from the checkpoint, not measured again
    rows += [h for h in resumed.fit().history if "knn_top1" in h]
    assert [r["step"] for r in rows] == [0, 3, 6, 9]
    assert all(r["knn_gain"] <= -1 for r in rows[1:]), rows
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("[knn] at initialisation") == 1 and "information collapse" in text
    # the end-of-run kNN (knn.json) reuses the evaluation made at the last epoch instead of a second pass
    monkeypatch.setattr(knn_monitor, "knn_of_backbone", lambda *a, **k: pytest.fail("second kNN pass at the end"))
    train_cli._final_knn(resumed)
    with open(tmp_path / "knn.json") as f:
        assert json.load(f)["k20"]["top1"] == pytest.approx(rows[-1]["knn_top1"])
    # a resumed run's streaks start afresh (the wiped student also trips the dimensional criterion)
    assert [(e["step"], e["since"]) for e in _events(tmp_path) if e["kind"] == "information"] == [(9, 6)]
