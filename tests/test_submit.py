"""submit.py on submitit: the flags become SLURM parameters, and a job interrupted mid-run (submitit's local executor
sends the same pre-emption signal SLURM does) is requeued, resumes from its newest checkpoint and finishes."""

import json
import os
import time

import psutil
import pytest
from submitit.local.local import LocalJobEnvironment

import submit
from engine.slurm import TrainJob, with_resume_auto
from runtime import checkpoint as ckpt
from tests.conftest import ROOT, TINY_OVERRIDES


def _train_argv(tiny_folder, out_dir, *extra):
    return ["--method", "dino", *TINY_OVERRIDES, "model.precision=fp32", f"data.train_path={tiny_folder}/train",
            f"train.out_dir={out_dir}", "train.epochs=3", "train.steps_per_epoch=3", "train.ckpt_every=2",
            "train.keep_last=10", *extra]


def test_with_resume_auto_replaces_any_resume():
    assert with_resume_auto(["--method", "dino", "--resume", "x.pt", "a=1"]) == ["--resume", "auto", "--method",
                                                                                   "dino", "a=1"]
    assert with_resume_auto(["--resume=x", "train.resume=y", "b=2"]) == ["--resume", "auto", "b=2"]


def test_flags_become_sbatch_lines(tiny_folder, tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit's SLURM executor looks for srun on PATH
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    opts, rest = submit.parse_args(["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "90",
                                    "--account", "proj", "--cpus-per-task", "6", "--mem-gb", "200",
                                    "--log-dir", str(tmp_path / "logs"), "--", *_train_argv(tiny_folder, tmp_path)])
    assert rest[:2] == ["--method", "dino"]
    ex = submit.build_executor(opts, submit.check_train_args(rest))
    text = ex._executor._make_submission_file_text("python -m x", "uid")  # the sbatch script submitit would send
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=90",
                 "--account=proj", "--cpus-per-task=6", "--mem=200GB", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in text, line
    assert f"#SBATCH --output={tmp_path}/logs/%j/%j_0_log.out" in text  # logs per job id
    assert f"--output {tmp_path}/logs/%j/%j_%t_log.out" in text  # and per task


def test_bad_train_args_fail_at_submit_time(tmp_path, capsys):
    assert submit.main(["--cluster", "local", "--", "--method", "dino", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        submit.main(["--nodes", "1", "--method", "dino"])
    assert e.value.code == 2


class SlowTrainJob(TrainJob):
    """TrainJob whose steps take >= 0.4 s, so the test can interrupt it between two checkpoints."""

    def __call__(self):
        from engine.trainer import Trainer

        real = Trainer.train_step

        def slow(trainer, batch, ctx):
            time.sleep(0.4)
            return real(trainer, batch, ctx)

        Trainer.train_step = slow
        return super().__call__()


@pytest.mark.slow
def test_interrupted_job_is_requeued_and_resumes(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the job process unpickles SlowTrainJob from this module
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    opts, rest = submit.parse_args(["--cluster", "local", "--time", "20", "--", *_train_argv(tiny_folder, run)])
    job = submit.launch(opts, rest, job_cls=SlowTrainJob)
    deadline = time.time() + 600
    while not ckpt.list_checkpoints(str(run)) and time.time() < deadline:
        assert job.state not in ("FINISHED", "FAILED"), job.stderr()
        time.sleep(0.2)
    cut = ckpt.list_checkpoints(str(run))[0][0]
    # SLURM's pre-emption signal goes to the job's tasks (LocalJob._interrupt signals the local controller, which
    # does not forward it): USR2 -> submitit calls TrainJob.checkpoint() -> the controller restarts the task
    tasks = psutil.Process(job._process.pid).children()
    assert len(tasks) == 1
    tasks[0].send_signal(LocalJobEnvironment._usr_sig())
    assert job.result() == 0  # waits for the requeued run
    log = job.stdout()
    assert "requeued" in log and "[resume]" in log
    resumed_at = int(log.split("[resume]")[1].split("at step ")[1].split()[0])
    assert cut <= resumed_at < 9  # resumed from a checkpoint it had written, not from scratch or the end
    assert ckpt.list_checkpoints(str(run))[0][0] == 9  # finished with the uninterrupted run's final step
    with open(run / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 10))  # each step logged once
    assert os.path.isfile(run / "curves.png")  # the end-of-run picture of the finished job
    assert os.path.isdir(tmp_path / "run.slurm" / str(job.job_id))  # logs per job, beside the run folder
