"""The run directory: a used train.out_dir is never overwritten or mixed, corrupt checkpoints are moved aside, stale
temporaries of killed runs are cleaned, resume mismatches name the config keys (train.py main(argv), in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import train as train_cli
from engine.config import load_config
from engine.trainer import Trainer
from runtime import checkpoint as ckpt
from runtime import run_dir
from tests.conftest import TINY_OVERRIDES

# test_resnet (0.4 M parameters) keeps each checkpoint at ~5 MB; fp32 for reproducible numerics
SMALL = [*TINY_OVERRIDES, "model.backbone=test_resnet", "model.precision=fp32", "train.epochs=1",
         "train.steps_per_epoch=2"]


def _argv(folder, out_dir, *extra):
    return ["--method", "dino", *SMALL, f"data.train_path={folder}/train", f"train.out_dir={out_dir}", *extra]


def _cfg(folder, out_dir, *extra):
    return load_config("dino", [], SMALL + [f"data.train_path={folder}/train", f"train.out_dir={out_dir}", *extra])


def make_run(folder, out_dir, steps=(1, 2)):
    """A run as a finished train.py leaves it (checkpoints + logged rows), written without running steps."""
    t = Trainer(_cfg(folder, out_dir))
    for s in steps:
        t.state.step = s
        t.metrics.write(s, {"loss": 1.0 / s})
        t.save()
    t.metrics.close()
    return t


def snapshot(folder):
    """name -> (size, mtime) of every file below ``folder``: what 'left untouched' means."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def corrupt(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def finished(tiny_folder, tmp_path_factory):
    """A finished run (checkpoints at steps 1 and 2, two logged rows); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    make_run(tiny_folder, out)
    return out


@pytest.fixture
def used(finished, tmp_path):
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(finished, dest)
    return dest


def _setup(kind, used, tmp_path, monkeypatch):
    """The train.out_dir of a table row."""
    if kind == "used":
        return used
    if kind == "all_corrupt":
        for _, p in ckpt.list_checkpoints(str(used)):
            corrupt(p)
        return used
    if kind == "file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f"
    if kind == "under_file":
        (tmp_path / "f").write_text("x")
        return tmp_path / "f" / "run"
    if kind == "read_only":  # as root chmod does not stop writes: the check itself is what is tested
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
        return tmp_path / "new_run"
    raise AssertionError(kind)


BAD = [  # (out_dir kind, extra argv, expected fragments)
    ("used", [], ["already holds a run", "2 checkpoint(s) up to step 2", "metrics.jsonl with 2 rows",
                  "--resume auto", "train.out_dir=", "--overwrite"]),
    ("all_corrupt", ["--resume", "auto"], ["no readable checkpoint", "ckpt_step00000002.pt (RuntimeError: ",
                                           "ckpt_step00000001.pt (RuntimeError: ", "corrupt/", "--overwrite"]),
    ("used", ["--resume", "auto", "ssl.out_dim=128"], ["model weights", "ssl.out_dim (checkpoint 256, this run 128)",
                                                       "cannot resume"]),
    ("used", ["--resume", "auto", "optim.name=adamw"], ["optim.name (checkpoint 'sgd', this run 'adamw')",
                                                        "cannot resume"]),
    ("used", ["--resume", "auto", "model.backbone=resnet18"], ["model.backbone (checkpoint 'test_resnet'"]),
    ("used", ["--resume", "missing.pt"], ["checkpoint not found: missing.pt"]),
    ("file", [], ["is an existing file", "set train.out_dir to a folder"]),
    ("under_file", [], ["cannot be created", "is a file"]),
    ("read_only", [], ["is not writable", "read-only filesystem or no permission"]),
]


@pytest.mark.parametrize("kind, extra, fragments", BAD, ids=[f"{k}-{' '.join(e)}" for k, e, _ in BAD])
def test_bad_run_dir_is_a_clear_error(kind, extra, fragments, used, tmp_path, tiny_folder, monkeypatch, capsys):
    out = _setup(kind, used, tmp_path, monkeypatch)
    before = snapshot(used)
    rc = train_cli.main(_argv(tiny_folder, out, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if kind == "used":
        assert snapshot(used) == before  # log, checkpoints and run.json untouched


def test_all_corrupt_is_moved_aside_and_stays_an_error(used, tiny_folder, capsys):
    for _, p in ckpt.list_checkpoints(str(used)):
        corrupt(p)
    for _ in range(2):  # the second start finds the quarantined files, not an empty folder: still an error
        assert train_cli.main(_argv(tiny_folder, used, "--resume", "auto")) == 2
    assert sorted(os.listdir(used / "corrupt")) == ["ckpt_step00000001.pt", "ckpt_step00000002.pt"]
    assert "moved there by an earlier start" in capsys.readouterr().err
    assert _rows(used) == [1, 2]  # the history is kept
    t = Trainer(_cfg(tiny_folder, used, "train.resume=auto"), overwrite=True)  # the user asked to start over
    assert t.state.step == 0 and sorted(os.listdir(used)) == ["config.yaml", "metrics.jsonl", "run.json"]
    old = [p for p in os.listdir(used.parent) if p.startswith("run.old-")]
    assert len(old) == 1 and sorted(os.listdir(used.parent / old[0] / "corrupt")) == ["ckpt_step00000001.pt",
                                                                                       "ckpt_step00000002.pt"]


def _rows(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_overwrite_moves_the_old_run_aside(used, tiny_folder):
    before = snapshot(used)
    t = Trainer(_cfg(tiny_folder, used), overwrite=True)
    old = used.parent / next(p for p in os.listdir(used.parent) if p.startswith("run.old-"))
    assert snapshot(old) == {k: v for k, v in before.items()}  # moved whole, nothing lost
    assert ckpt.list_checkpoints(str(used)) == [] and _rows(used) == []
    assert t.run.run_id != json.loads((old / "run.json").read_text())["run_id"]


def test_corrupt_newest_is_quarantined_and_prune_counts_only_own_files(used, tiny_folder, capsys):
    newest = ckpt.checkpoint_path(str(used), 2)
    corrupt(newest)
    foreign = ckpt.checkpoint_path(str(used), 99)  # e.g. copied in by hand: not this run's
    with open(foreign, "wb") as f:
        f.write(b"not ours")
    t = Trainer(_cfg(tiny_folder, used, "train.resume=auto", "train.keep_last=1"))
    assert t.state.step == 1 and os.listdir(used / "corrupt") == ["ckpt_step00000002.pt"]
    assert "moved unreadable" in capsys.readouterr().out
    t.state.step = 3
    t.save()  # prune keeps the newest own checkpoint; the foreign step-99 file is neither counted nor deleted
    assert [s for s, _ in ckpt.own_checkpoints(str(used))] == [3]
    assert [s for s, _ in ckpt.list_checkpoints(str(used))] == [99, 3]


def test_ledger_lists_a_checkpoint_before_it_exists(tmp_path):
    run = run_dir.RunDir.create(str(tmp_path))
    for s in (1, 2, 3):
        path = ckpt.checkpoint_path(str(tmp_path), s)
        run.will_write(path)
        if s < 3:  # step 3: killed between the ledger entry and the file
            open(path, "wb").close()
    assert [s for s, _ in ckpt.own_checkpoints(str(tmp_path))] == [2, 1]
    run.prune(1)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]
    assert ckpt.read_marker(str(tmp_path))["checkpoints"] == ["ckpt_step00000002.pt"]


def test_stale_temporaries_of_dead_writers_are_cleaned(used, tiny_folder, capsys):
    dead, alive = dead_pid(), os.getpid()
    stale = [f".ckpt_step00000003.pt.tmp.{dead}", f"metrics.jsonl.tmp-{dead}", f".run.json.tmp-{dead}"]
    live = f".ckpt_step00000003.pt.tmp.{alive}"  # a writer that still runs: left alone
    for name in [*stale, live]:
        (used / name).write_bytes(b"partial")
    Trainer(_cfg(tiny_folder, used, "train.resume=auto"))
    out = capsys.readouterr().out
    assert not any((used / n).exists() for n in stale) and (used / live).exists()
    assert out.count("removed stale temporary") == 3 and f"pid {dead}" in out


def test_a_start_that_failed_early_does_not_block_a_fresh_run(tiny_folder, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_folder, out)).metrics.close()  # claimed, then died before logging anything
    Trainer(_cfg(tiny_folder, out))  # not refused: nothing of value is there
    assert sorted(os.listdir(out)) == ["config.yaml", "metrics.jsonl", "run.json"]


def test_resume_accepts_a_run_dir_and_overrides_anywhere(used, tiny_folder, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  log_every: 1\n")
    argv = ["train.knn_at_end=false", *_argv(tiny_folder, used, "--config", str(extra), "--resume", str(used)),
            "train.tensorboard=false"]
    assert train_cli.main(argv) == 0
    assert f"[resume] {used}/ckpt_step00000002.pt at step 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, overrides", [
    (["a.b=1", "--method", "dino", "--config", "x.yaml", "c=2"], ["a.b=1", "c=2"]),
    (["--method", "dino", "a=1", "--config", "x.yaml", "b=2", "--config", "y.yaml", "c=3"], ["a=1", "b=2", "c=3"]),
    (["--method", "dino"], []),
])
def test_train_overrides_anywhere(argv, overrides):
    args = train_cli.parse_args(argv)
    assert args.overrides == overrides and args.method == "dino"


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "dino", "--bogus"], "unrecognized arguments: --bogus"),
    (["--method", "dino", "a=1", "--bogus", "b=2"], "unrecognized arguments: --bogus"),
])
def test_train_unknown_arguments_still_refused(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(argv)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


def test_eval_overrides_anywhere_and_where_they_go(capsys):
    import argparse

    import eval as eval_cli

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    eval_cli.add_linear_parser(sub)
    eval_cli.add_knn_parser(sub)
    args = eval_cli.parse_args_with_overrides(p, ["linear", "lr=0.1", "--checkpoint", "c", "--data", "d",
                                                  "--val-data", "v", "epochs=3"])
    assert args.overrides == ["lr=0.1", "epochs=3"]
    with pytest.raises(SystemExit):
        eval_cli.parse_args_with_overrides(p, ["knn", "--checkpoint", "c", "--train-dir", "a", "--val-dir", "b", "k=3"])
    assert "takes no key=value overrides" in capsys.readouterr().err


def test_eval_run_dir_with_only_corrupt_checkpoints(used, capsys):
    import eval as eval_cli

    for _, p in ckpt.list_checkpoints(str(used)):
        corrupt(p)
    rc = eval_cli.main(["knn", "--checkpoint", str(used), "--train-dir", "a", "--val-dir", "b"])
    err = capsys.readouterr().err
    assert rc == 2 and "no readable checkpoint in run directory" in err and "2 found, all unreadable" in err
    assert ckpt.list_checkpoints(str(used)) != []  # eval reads only: nothing moved
