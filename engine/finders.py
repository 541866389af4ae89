"""train.py's ``--find-batch-size`` and ``--find-lr`` (MV-MR's ``--auto_bs`` / ``--auto_lr``): flags, printing,
results files and ``--write-config``.

Results go to ``--finder-out`` (default ``<train.out_dir>/finders/``): ``batch_size.json``, ``lr_find.json`` and
``lr_find.png``. No checkpoint, config.yaml or metrics.jsonl is written anywhere (the measurements run in a temporary
folder, :mod:`engine.scratch_run`). ``--write-config FILE`` writes a new YAML holding only the found value
(``data.batch_size`` or ``optim.lr``) to layer as a later ``--config``; an existing FILE is never replaced.
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from engine.config import Config
from runtime.config_loader import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("finders (measure, print and exit; no checkpoint is written)")
    g.add_argument("--find-batch-size", action="store_true", help="largest per-device batch that fits in memory")
    g.add_argument("--memory-budget-gb", type=float, default=None,
                   help="CPU (required): peak RSS a step may use; CUDA (optional): cap on peak reserved memory")
    g.add_argument("--max-batch-size", type=int, default=0, help="search bound (default: training images)")
    g.add_argument("--batch-multiple", type=int, default=8, help="candidates are multiples of this")
    g.add_argument("--find-lr", action="store_true", help="learning-rate range test; suggests optim.lr")
    g.add_argument("--lr-min", type=float, default=1e-6, help="first lr of the sweep (absolute)")
    g.add_argument("--lr-max", type=float, default=1.0, help="last lr of the sweep (absolute)")
    g.add_argument("--lr-steps", type=int, default=200, help="steps of the exponential sweep")
    g.add_argument("--write-config", default=None, help="write the found value to this NEW YAML file")
    g.add_argument("--finder-out", default=None, help="results folder (default <train.out_dir>/finders)")


def wanted(args: argparse.Namespace) -> bool:
    return bool(args.find_batch_size or args.find_lr)


def run(args: argparse.Namespace, cfg: Config) -> dict:
    """Run the requested finder; returns its results dict (also written as JSON)."""
    if args.find_batch_size and args.find_lr:
        raise ConfigError("--find-batch-size and --find-lr: run one at a time (the lr depends on the batch: find "
                          "the batch first, then --find-lr with --config <the written file>)")
    if args.write_config and os.path.exists(args.write_config):
        raise ConfigError(f"--write-config: {args.write_config} already exists; choose a new file name (it is never "
                          "overwritten)")
    out_dir = args.finder_out or os.path.join(cfg.train.out_dir, "finders")
    return _find_batch(args, cfg, out_dir) if args.find_batch_size else _find_lr(args, cfg, out_dir)


def _find_batch(args, cfg: Config, out_dir: str) -> dict:
    from engine.batch_finder import find_batch_size

    s = find_batch_size(cfg, args.memory_budget_gb, args.max_batch_size, args.batch_multiple)
    measured = s.measured
    res = {"method": cfg.method, "backbone": cfg.model.backbone, "batch_size": s.best,
           "memory_budget_gb": args.memory_budget_gb, "measured": measured,
           "probes": [{"batch": p.batch, "fits": p.fits, "peak_gib": p.peak_bytes / 2**30, "seconds": p.seconds,
                       "reason": p.reason} for p in s.probes],
           "seconds": sum(p.seconds for p in s.probes)}
    _save(res, os.path.join(out_dir, "batch_size.json"))
    print(f"[find-batch-size] largest per-device batch: {s.best} ({measured}; budget "
          f"{args.memory_budget_gb} GiB; {len(s.probes)} probes, {res['seconds']:.0f} s)")
    _maybe_write_config(args.write_config, {"data": {"batch_size": s.best}}, res)
    return res


def _find_lr(args, cfg: Config, out_dir: str) -> dict:
    from engine.lr_finder import config_lr, lr_range_test, plot_sweep

    sweep = lr_range_test(cfg, args.lr_min, args.lr_max, args.lr_steps)
    png = os.path.join(out_dir, "lr_find.png")
    plot_sweep(sweep, png, f"{cfg.method} {cfg.model.backbone} batch {cfg.data.batch_size}: lr range test")
    res = {"method": cfg.method, "backbone": cfg.model.backbone, "batch_size": cfg.data.batch_size,
           "optimizer": cfg.optim.name, "steps_run": len(sweep.lrs), "stopped_early": sweep.stopped_early,
           "suggested_lr": sweep.suggested_lr, "min_loss_lr": sweep.min_loss_lr,
           "suggested_config_lr": config_lr(sweep.suggested_lr, cfg), "lr_scaling": cfg.optim.lr_scaling,
           "seconds": sweep.seconds, "png": png, "lrs": sweep.lrs, "losses": sweep.losses,
           "smoothed": sweep.smoothed}
    _save(res, os.path.join(out_dir, "lr_find.json"))
    stop = " (stopped: loss diverged)" if sweep.stopped_early else ""
    print(f"[find-lr] {len(sweep.lrs)} steps in {sweep.seconds:.0f} s{stop}; steepest descent at lr "
          f"{sweep.suggested_lr:.3g} -> optim.lr={res['suggested_config_lr']:.3g} "
          f"(lr_scaling={cfg.optim.lr_scaling}); min-loss lr / 10 = {sweep.min_loss_lr / 10:.3g}; curve: {png}")
    _maybe_write_config(args.write_config, {"optim": {"lr": res["suggested_config_lr"]}}, res)
    return res


def _save(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    existed = os.path.exists(path)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"[finders] {'replaced' if existed else 'wrote'} {path}")


def _maybe_write_config(path: str | None, values: dict, res: dict) -> None:
    if not path:
        return
    flag = "--find-lr" if "optim" in values else "--find-batch-size"
    header = (f"# written by train.py {flag} for method={res['method']} backbone={res['backbone']}; layer it after "
              f"the recipe: --config <recipe> --config {os.path.basename(path)}\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "x") as f:  # "x": fails rather than replacing a file created since the check in run()
        f.write(header)
        yaml.safe_dump(values, f, sort_keys=False)
    print(f"[finders] wrote {path}")
