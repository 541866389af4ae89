"""SSL pretraining entry point.

    torchrun --nproc_per_node=N train.py --method dino --config configs/exp/dino_demo.yaml optim.lr=0.05

One process, N processes on one machine and multi-node (torchrun rendezvous) all go through this file: torchrun sets
the environment, ``runtime.dist`` reads it (NCCL on CUDA, gloo on CPU).

``train.out_dir`` holds one run (``runtime/run_dir.py``): a fresh run into a folder that holds one is refused unless
``--resume auto`` continues it or ``--overwrite`` moves it aside first (docs/failure_modes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from runtime.cli_args import parse_args_with_overrides
from runtime.cli_types import positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from engine import finders

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from methods import METHODS

    p.add_argument("--method", required=True, choices=sorted(METHODS), help="SSL method (methods/<name>.py)")
    p.add_argument("--config", action="append", default=[], help="experiment YAML (repeatable; later files win)")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest readable checkpoint of the run in train.out_dir), a checkpoint file, or a run "
                        "directory (its newest readable checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a train.out_dir that holds a run: its contents are moved to "
                        "<out_dir>.old-<time> first (a fresh run into a used folder is refused otherwise)")
    p.add_argument("--benchmark", action="store_true", help="measure loader / model step / end to end and exit")
    p.add_argument("--steps", type=positive_int, default=20, help="steps per benchmark phase (with --benchmark)")
    finders.add_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides anywhere on the line, e.g. data.batch_size=128 "
                                                "optim.lr=0.05")
    return parse_args_with_overrides(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine import finders
    from engine.collapse import CollapseError
    from engine.config import load_config
    from runtime.checkpoint import CheckpointError
    from runtime.config_loader import ConfigError

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.method, args.config, overrides)
        if finders.wanted(args):  # --find-batch-size / --find-lr: measure, print, exit (no checkpoint)
            finders.run(args, cfg)
            return 0
        if args.benchmark:
            from engine.benchmark import run_benchmark

            run_benchmark(cfg, args.steps)
            return 0
        from engine.trainer import Trainer

        trainer = Trainer(cfg, overwrite=args.overwrite)
        trainer.fit()
        if cfg.train.knn_at_end:
            _final_knn(trainer)
        from engine.plots import plot_run_safely

        plot_run_safely(cfg.train.out_dir)  # rank 0, after the last checkpoint and knn.json; a failure only warns
    except (ConfigError, CheckpointError, CollapseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from runtime import dist

        dist.shutdown()
    return 0


def _final_knn(trainer) -> None:
    """kNN of the trained backbone on eval.train_dir / eval.val_dir, written to <out_dir>/knn.json."""
    from engine.knn_monitor import knn_result
    from runtime import dist
    from runtime.logging import log

    cfg = trainer.cfg
    res = trainer.knn.result_at(trainer.state.step) if trainer.knn is not None else None  # train.knn_every's last
    if res is None:
        res = knn_result(cfg, trainer.method.backbone_for_eval(cfg.eval.features), trainer.device)
    if dist.is_main():
        with open(os.path.join(cfg.train.out_dir, "knn.json"), "w") as f:
            json.dump(res, f, indent=2)
    top1 = res[f"k{cfg.eval.knn_k}"]["top1"]
    log(f"[knn] k={cfg.eval.knn_k} T={cfg.eval.knn_t}: top-1 {top1:.2f}% ({res['seconds']:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
