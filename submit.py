"""Launch train.py on SLURM through submitit (one task per GPU, requeued on pre-emption / time-out).

    python submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 2880 --account myproj --cpus-per-task 10 \\
        --mem-gb 400 -- --method dino --config configs/exp/dino_in1k.yaml train.out_dir=/shared/runs/dino

Everything after ``--`` goes to train.py unchanged (its arguments are checked here first, so a bad config fails now
and not after hours in the queue). A pre-empted or timed-out job is requeued and restarts with ``--resume auto``
(newest valid checkpoint in ``train.out_dir``, which must be on a filesystem every node sees). Logs and
submitit's files go to ``--log-dir`` (default ``<train.out_dir>.slurm``, beside the run folder), one folder per job
id. ``--cluster local`` runs the same job on this machine (submitit's local executor: tasks as processes, same
requeue logic) for testing.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="also the tasks (train.py processes) per node")
    p.add_argument("--cpus-per-task", type=int, default=10, help="loader workers + the process driving the GPU")
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0 = the partition's default)")
    p.add_argument("--time", type=int, default=60 * 24, help="wall-clock limit in minutes")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None, help="e.g. a GPU type: volta32gb")
    p.add_argument("--name", default=None, help="job name (default flashssl-<method>)")
    p.add_argument("--max-requeues", type=int, default=10, help="time-outs after which the job is not requeued")
    p.add_argument("--signal-delay-s", type=int, default=120, help="seconds between the requeue signal and the kill")
    p.add_argument("--log-dir", default=None, help="submitit folder (default <train.out_dir>.slurm); %%j = job id")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="local/debug: run here with submitit's local or in-process debug executor (testing)")
    if "--" not in argv:
        p.error("put train.py's arguments after '--', e.g. submit.py --nodes 1 -- --method dino --config X.yaml")
    cut = argv.index("--")
    return p.parse_args(argv[:cut]), argv[cut + 1:]


def check_train_args(train_argv: list[str]):
    """Resolve train.py's config now; returns it (raises ConfigError with train.py's message on bad input)."""
    import train
    from engine.config import load_config

    targs = train.parse_args(train_argv)
    overrides = list(targs.overrides) + ([f"train.resume={targs.resume}"] if targs.resume else [])
    return load_config(targs.method, targs.config, overrides)


def build_executor(opts: argparse.Namespace, cfg):
    """The submitit AutoExecutor with the flags as SLURM parameters; logs in ``<log dir>/%j``."""
    import submitit

    folder = os.path.join(opts.log_dir or cfg.train.out_dir.rstrip("/") + ".slurm", "%j")
    ex = submitit.AutoExecutor(folder=folder, cluster=opts.cluster, slurm_max_num_timeout=opts.max_requeues)
    ex.update_parameters(name=opts.name or f"flashssl-{cfg.method}", nodes=opts.nodes,
                         tasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node,
                         cpus_per_task=opts.cpus_per_task, timeout_min=opts.time)
    if opts.mem_gb:
        ex.update_parameters(mem_gb=opts.mem_gb)
    slurm = {"partition": opts.partition, "account": opts.account, "qos": opts.qos, "constraint": opts.constraint}
    ex.update_parameters(slurm_signal_delay_s=opts.signal_delay_s,
                         **{f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return ex


def launch(opts: argparse.Namespace, train_argv: list[str], job_cls=None):
    """Check the train arguments, submit, return the submitit Job."""
    from engine.slurm import TrainJob

    cfg = check_train_args(train_argv)
    if opts.nodes < 1 or opts.gpus_per_node < 1:
        from runtime.config_loader import ConfigError

        raise ConfigError(f"--nodes / --gpus-per-node: need >= 1, got {opts.nodes} / {opts.gpus_per_node}")
    executor = build_executor(opts, cfg)
    return executor.submit((job_cls or TrainJob)(train_argv))


def main(argv: list[str] | None = None) -> int:
    from runtime.checkpoint import CheckpointError
    from runtime.config_loader import ConfigError

    opts, train_argv = parse_args(argv)
    try:
        job = launch(opts, train_argv)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: {opts.nodes} node(s) x {opts.gpus_per_node} GPU(s); logs: {job.paths.stdout}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
