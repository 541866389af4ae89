"""The submitit job behind ``submit.py``: train.py as a checkpointable callable.

submitit starts one task per GPU (``tasks_per_node = gpus_per_node``) on every node and calls :class:`TrainJob` in
each. The task exports the torch.distributed variables torchrun would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` from submitit's job environment), so :mod:`runtime.dist` needs nothing SLURM-specific,
then runs ``train.main`` with the user's arguments.

Pre-emption and time-out: SLURM sends the job its signal ``signal_delay_s`` before the kill; submitit then calls
:meth:`TrainJob.checkpoint` on the main task, which returns the same job with ``--resume auto`` (the newest valid
checkpoint in ``train.out_dir``, :func:`runtime.checkpoint.find_resumable`), and requeues it. Work since the last
checkpoint (at most ``train.ckpt_every`` steps or one epoch) is redone; ``metrics.jsonl`` drops the rows logged
after that checkpoint, so the history has each step once.
"""

from __future__ import annotations

import os


def with_resume_auto(argv: list[str]) -> list[str]:
    """train.py's ``argv`` with every ``--resume X`` / ``--resume=X`` / ``train.resume=X`` replaced by one
    ``--resume auto``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume=") or a.startswith("train.resume="):
            continue
        out.append(a)
    return ["--resume", "auto", *out]


def export_dist_env() -> int:
    """Set torchrun's variables from the submitit job environment when the job has several tasks; returns the task
    count. CUDA devices are chosen by ``LOCAL_RANK`` (:func:`engine.setup.pick_device`), so every task sees all of its
    node's GPUs."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.num_tasks


class TrainJob:
    """``TrainJob(train_argv)()`` runs ``train.py train_argv`` in a submitit task; picklable and checkpointable."""

    def __init__(self, train_argv: list[str]):
        self.train_argv = list(train_argv)

    def __call__(self) -> int:
        export_dist_env()
        import train

        rc = train.main(self.train_argv)
        if rc != 0:  # a failed run must show as a failed job (submitit re-raises this in job.result())
            raise RuntimeError(f"train.py {' '.join(self.train_argv)} exited with code {rc} (see the job's log)")
        return rc

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on pre-emption / time-out: requeue this job resuming from the newest checkpoint."""
        import submitit

        print(f"[slurm] requeued (pid {os.getpid()}): the next start resumes with --resume auto", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(with_resume_auto(self.train_argv)))
