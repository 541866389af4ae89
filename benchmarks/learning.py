"""Does a recipe learn? ``python -m benchmarks.learning [--methods dino scfs ...] [--recipe small|demo] [--epochs N]``.

Trains each method's recipe (``configs/exp/<method>_<recipe>.yaml``) through the real trainer on a labelled
ImageFolder (the real-image digits set by default, or the built-in demo set), then compares weighted kNN (k 20,
T 0.07, top-1, the method's evaluated weights) of the trained backbone with the same backbone at initialisation.
It prints one Markdown row per method: steps, kNN trained / random init / difference, the final feature effective
rank, whether the collapse guard fired, and the training wall time. ``tests/methods/test_learning.py`` runs the same
function with each small recipe's ``check:`` section (epochs, batch size, asserted kNN gain).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from engine.config import CONFIG_DIR, Config, load_config
from engine.trainer import NonFiniteLossError, Trainer
from evaluation.knn_backbone import knn_of_backbone
from evaluation.knn_eval import random_init_backbone
from methods import METHODS
from pipeline.convert.demo_dataset import ensure_demo_dataset
from pipeline.convert.digits_dataset import ensure_digits_dataset

DATASETS = {"digits": ensure_digits_dataset, "demo": ensure_demo_dataset}

_RANDOM_INIT: dict[str, float] = {}  # init fingerprint -> kNN@20 top-1, shared by methods with the same init


@dataclass
class LearningResult:
    """One short training run and its kNN against the random init."""

    method: str
    recipe: str
    steps: int  # steps trained
    total_steps: int  # steps the schedule asked for
    trained: float  # kNN@20 top-1 %, trained backbone
    random_init: float  # kNN@20 top-1 %, the same backbone at initialisation
    feat_rank: float  # effective rank of the student's pooled features at the last log step
    final_loss: float
    collapse: tuple[str, ...]  # collapse kinds the guard reported (empty = silent)
    finite: bool  # every logged loss and every student parameter finite
    train_seconds: float

    @property
    def gain(self) -> float:
        return self.trained - self.random_init

    def row(self) -> str:
        guard = ", ".join(self.collapse) or "silent"
        if not self.finite:
            guard += "; NON-FINITE"
        return (f"| {self.method} | `{self.recipe}` | {self.steps} | {self.trained:.1f} % | {self.random_init:.1f} % "
                f"| {self.gain:+.1f} | {self.feat_rank:.1f} | {guard} | {self.train_seconds:.0f} s |")


HEADER = ("| method | recipe | steps | kNN@20 trained | random init | difference | final effective rank | "
          "collapse guard | train wall time |\n|---|---|---:|---:|---:|---:|---:|---|---:|")


def recipe_path(method: str, recipe: str) -> str:
    return os.path.join(CONFIG_DIR, "exp", f"{method}_{recipe}.yaml")


def learning_config(method: str, recipe: str, root: str, out_dir: str, epochs: int | None = None,
                    batch_size: int | None = None, overrides: list[str] | None = None) -> Config:
    """The recipe pointed at the ImageFolder ``root`` ({train,val}/<class>/...) with the torchvision loader.

    ``epochs`` / ``batch_size``: None = the recipe's ``check:`` values where it has them, else its own. The run is
    fp32 on every machine (``model.precision=auto`` would pick bf16 on CPUs with AMX), so that a gain measured on one
    CPU carries over to another up to the order of floating-point reductions.
    """
    base = load_config(method, [recipe_path(method, recipe)])
    epochs = epochs or base.check.epochs or base.train.epochs
    batch_size = batch_size or base.check.batch_size or base.data.batch_size
    return load_config(method, [recipe_path(method, recipe)], [
        "data.loader=torchvision", f"data.train_path={root}/train", f"eval.train_dir={root}/train",
        f"eval.val_dir={root}/val", f"train.out_dir={out_dir}", f"train.epochs={epochs}",
        f"data.batch_size={batch_size}", "train.log_every=2", "train.tensorboard=false", "train.ckpt_every=100000",
        "train.knn_at_end=false", "model.precision=fp32", *(overrides or [])])


def random_init_knn(cfg: Config) -> float:
    """kNN@20 top-1 of the method's evaluated backbone at initialisation, computed once per distinct init."""
    backbone = random_init_backbone(cfg)
    h = hashlib.sha1(f"{cfg.data.eval_size} {cfg.eval.train_dir} {cfg.eval.val_dir}".encode())
    for t in backbone.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    key = h.hexdigest()
    if key not in _RANDOM_INIT:
        res = knn_of_backbone(backbone, cfg, cfg.eval.train_dir, cfg.eval.val_dir, torch.device("cpu"))
        _RANDOM_INIT[key] = res["k20"]["top1"]
    return _RANDOM_INIT[key]


def run_learning(cfg: Config, recipe: str) -> LearningResult:
    """Train ``cfg`` to its end, then kNN of the trained and of the random-init backbone."""
    rand = random_init_knn(cfg)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except NonFiniteLossError as e:  # reported as a row (finite=False) so that a sweep goes on
        print(f"{cfg.method}: {e}", file=sys.stderr)
    state = trainer.state
    seconds = time.perf_counter() - t0
    losses = torch.tensor([h["loss"] for h in state.history if "loss" in h])
    finite = bool(torch.isfinite(losses).all()) and all(
        bool(torch.isfinite(p).all()) for p in trainer.method.student.parameters())
    trained = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir,
                              trainer.device)["k20"]["top1"]
    ranks = [h["feat_rank"] for h in state.history if "feat_rank" in h]
    nan = float("nan")
    return LearningResult(cfg.method, recipe, state.step, trainer.total_steps, trained, rand,
                          ranks[-1] if ranks else nan, float(losses[-1]) if len(losses) else nan,
                          tuple(sorted(trainer.guard.reported)), finite, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    p.add_argument("--recipe", default="small", help="configs/exp/<method>_<recipe>.yaml (small, demo)")
    p.add_argument("--data", default="digits",
                   help="digits or demo (the built-in sets, written under data/ when missing), or the root of any\n"
                        "labelled ImageFolder with train/ and val/ splits")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's check.epochs, else train.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's check.batch_size")
    p.add_argument("--out-dir", default="runs/learning", help="one fresh run folder per method below it")
    p.add_argument("--json", default="", help="also append each result as a JSON line to this file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every method")
    args = p.parse_args(argv)
    for m in args.methods:
        if not os.path.exists(recipe_path(m, args.recipe)):
            print(f"error: no recipe {recipe_path(m, args.recipe)} for method {m}", file=sys.stderr)
            return 2
    if args.data in DATASETS:
        root = DATASETS[args.data](os.path.join("data", args.data))
    elif all(os.path.isdir(os.path.join(args.data, split)) for split in ("train", "val")):
        root = args.data
    else:
        print(f"error: --data {args.data!r} is neither {' nor '.join(sorted(DATASETS))} nor a folder with train/ and "
              "val/ ImageFolder splits", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(HEADER)
    for m in args.methods:
        out_dir = os.path.join(args.out_dir, f"{m}_{args.recipe}_{os.path.basename(os.path.normpath(root))}_{stamp}")
        cfg = learning_config(m, args.recipe, root, out_dir, args.epochs, args.batch_size, args.overrides)
        res = run_learning(cfg, f"{m}_{args.recipe}")
        print(res.row(), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**res.__dict__, "data": args.data, "gain": res.gain}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
