"""A run interrupted after k steps and resumed reproduces the uninterrupted run step for step (CPU)."""

import os

import pytest
import torch

from engine.config import load_config
from engine.trainer import Trainer
from runtime import checkpoint as ckpt
from runtime import run_dir as run_dir_mod
from tests.conftest import TINY_OVERRIDES


def _cfg(folder, out_dir, *extra):
    # fp32: oneDNN's bf16 CPU kernels are not bitwise reproducible across processes (measured: 2e-6 weight drift after
    # 2 steps with bf16 + channels-last, 0 in fp32), so bit-exact resume is asserted in fp32.
    return load_config("dino", [], TINY_OVERRIDES + ["model.precision=fp32",
        f"data.train_path={folder}/train", f"train.out_dir={out_dir}", "train.epochs=2", "train.steps_per_epoch=3",
        "train.ckpt_every=2", "train.keep_last=10", *extra])


class Killed(Exception):
    pass


def _losses(history):
    return {h["step"]: h["loss"] for h in history}


@pytest.mark.slow
def test_resume_matches_uninterrupted(tiny_folder, tmp_path, monkeypatch):
    full = Trainer(_cfg(tiny_folder, tmp_path / "full"))
    full_hist = _losses(full.fit().history)
    assert sorted(full_hist) == list(range(1, 7))

    # interrupted run: dies when asked for step index 4 (after the step-4 checkpoint was written)
    run_dir = tmp_path / "cut"
    t = Trainer(_cfg(tiny_folder, run_dir))
    real_step = Trainer.train_step

    def dying_step(self, batch, ctx):
        if ctx.step == 4:
            raise Killed()
        return real_step(self, batch, ctx)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        t.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir))][0] == 4

    resumed = Trainer(_cfg(tiny_folder, run_dir, "train.resume=auto"))
    assert resumed.state.step == 4
    res_hist = _losses(resumed.fit().history)
    for step in (5, 6):
        assert res_hist[step] == full_hist[step], (step, res_hist[step], full_hist[step])
    for (n, a), (_, b) in zip(full.method.state_dict().items(), resumed.method.state_dict().items()):
        assert torch.equal(a, b), n  # student, teacher and DINO center identical


@pytest.mark.slow
def test_auto_resume_skips_corrupt_newest(tiny_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    Trainer(_cfg(tiny_folder, run_dir, "train.epochs=1")).fit()
    steps = ckpt.list_checkpoints(str(run_dir))
    assert [s for s, _ in steps] == [3, 2]
    newest = steps[0][1]
    with open(newest, "r+b") as f:  # truncate: a job killed mid-copy, or disk full
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(newest)
    t = Trainer(_cfg(tiny_folder, run_dir, "train.resume=auto"))
    assert t.state.step == 2
    assert "skipping" in capsys.readouterr().out
    assert _logged_steps(run_dir) == [1, 2]  # step 3 of the first run is re-done, not logged twice
    t.fit()
    assert _logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # the resumed run goes on to its 2 epochs
    assert os.listdir(run_dir / "corrupt") == [os.path.basename(newest)]  # moved aside, never pruned-counted
    with pytest.raises(run_dir_mod.RunDirError, match="already holds a run"):  # a fresh run there is refused
        Trainer(_cfg(tiny_folder, run_dir, "train.epochs=1"))
    assert _logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]  # and the log is kept


def _logged_steps(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt_step00000001.pt"

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.atomic_save({"x": 1}, str(target))
    assert list(tmp_path.iterdir()) == []


def test_resume_rejects_other_method_checkpoint(tiny_folder, tmp_path):
    run_dir = tmp_path / "r"
    ckpt.atomic_save({"model": {}, "config": {"method": "dino", "model": {"backbone": "resnet50"}}, "step": 1},
                     ckpt.checkpoint_path(str(run_dir), 1))
    with pytest.raises(ckpt.CheckpointError, match=r"model.backbone \(checkpoint 'resnet50', this run 'resnet18'\)"):
        Trainer(_cfg(tiny_folder, run_dir, "train.resume=auto"))
