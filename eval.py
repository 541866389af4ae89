"""Evaluation of pretrained backbones.

    python eval.py knn --checkpoint runs/dino_demo --train-dir data/demo/train --val-dir data/demo/val

``--checkpoint`` takes a checkpoint file or a run directory (its newest valid checkpoint is used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def resolve_checkpoint(spec: str) -> str:
    from runtime.checkpoint import CheckpointError, find_resumable

    if os.path.isdir(spec):
        found = find_resumable(spec)
        if found is None:
            raise CheckpointError(f"no valid checkpoint (ckpt_step*.pt) in directory {spec}")
        return found[0]
    return spec


def add_knn_parser(sub) -> None:
    p = sub.add_parser("knn", help="weighted kNN on frozen features (ImageFolder splits)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--train-dir", required=True, help="labelled ImageFolder for the feature bank")
    p.add_argument("--val-dir", required=True, help="labelled ImageFolder to classify")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100], help="neighbour counts (DINO reports k=20)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim/T)")
    p.add_argument("--weights", default="auto", choices=["auto", "student", "teacher"],
                   help="which backbone: auto = the method's official evaluation choice")
    p.add_argument("--random-baseline", action="store_true", help="also evaluate a random-init backbone")
    p.add_argument("--report", default=None, help="run directory: print the demo results table with its images/s")
    p.add_argument("--out", default=None, help="write the results JSON here")


def run_knn(args) -> dict:
    import torch

    from evaluation.knn_eval import knn_of_checkpoint
    from evaluation.report import print_knn_table

    path = resolve_checkpoint(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = knn_of_checkpoint(path, args.train_dir, args.val_dir, device, args.weights, tuple(args.k),
                            args.temperature, args.random_baseline)
    res["checkpoint"] = path
    out = args.out or (os.path.join(args.report, "knn_eval.json") if args.report else None)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    print_knn_table(res, args.report)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_knn_parser(sub)
    args = parser.parse_args(argv)
    from runtime.checkpoint import CheckpointError
    from runtime.config_loader import ConfigError

    try:
        if args.command == "knn":
            run_knn(args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
