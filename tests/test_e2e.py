"""End to end: train.py on a tiny ImageFolder, then eval.py knn on its checkpoint; torchrun with 2 CPU ranks."""

import json
import os
import subprocess
import sys

import pytest

import eval as eval_cli  # noqa: E402
import train as train_cli  # noqa: E402
from tests.conftest import ROOT, TINY_OVERRIDES


def _args(folder, out_dir):
    return ["--method", "dino", *TINY_OVERRIDES, f"data.train_path={folder}/train", f"train.out_dir={out_dir}",
            "train.epochs=2", f"eval.train_dir={folder}/train", f"eval.val_dir={folder}/val"]


@pytest.mark.slow
def test_train_then_knn(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(tiny_folder, out)
    args.remove("train.knn_at_end=false")
    assert train_cli.main(args) == 0
    knn = json.loads((out / "knn.json").read_text())
    assert 0.0 <= knn["k20"]["top1"] <= 100.0
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["images_per_s"] > 0 for r in rows)

    rc = eval_cli.main(["knn", "--checkpoint", str(out), "--train-dir", f"{tiny_folder}/train",
                        "--val-dir", f"{tiny_folder}/val", "--k", "5", "20", "--random-baseline", "--report", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pretrained" in printed and "random_init" in printed and "images/s" in printed
    res = json.loads((out / "knn_eval.json").read_text())
    assert set(res) >= {"pretrained", "random_init", "checkpoint"}
    # the same checkpoint evaluated twice gives the same number (features are deterministic in eval mode)
    assert res["pretrained"]["k20"]["top1"] == pytest.approx(knn["k20"]["top1"])


def test_eval_bad_checkpoint_message(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = eval_cli.main(["knn", "--checkpoint", str(bad), "--train-dir", "a", "--val-dir", "b"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_cpu_ranks(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(ROOT, "train.py"), *_args(tiny_folder, out), "train.epochs=1", "data.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 24 images / (4 per rank x 2 ranks) = 3 steps per epoch: the checkpoint of the last step exists once
    assert sorted(os.listdir(out)).count("ckpt_step00000003.pt") == 1
