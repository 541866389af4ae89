"""Semi-supervised evaluation (``eval.py semi``): fine-tune the whole backbone + a linear classifier on a labelled
subset of the training split (1 % / 10 % of ImageNet in the papers), then top-1 / top-5 on the validation split.

    python eval.py semi --checkpoint runs/intl_demo --data data/demo/train --val-data data/demo/val --train-perc 10
    torchrun --nproc_per_node=8 eval.py semi --checkpoint runs/x --data train.beton --val-data val.beton \\
        --protocol intl-1pct --subset 1percent.txt

Recipes and their sources: :mod:`evaluation.semi_config`; subsets: :mod:`evaluation.subset`. Per step: the first
(only) view, RandomResizedCrop + flip, goes through ``Linear(D, C)(backbone(x))`` with the backbone in train mode
(BatchNorm statistics update, as in the official scripts), cross-entropy on the labels, one optimiser with two
param groups (classifier lr, backbone lr), each on the per-step schedule of :func:`evaluation.linear.lr_at`.
Distributed: the model is wrapped in DDP, each rank trains on its shard of the global batch (BatchNorm statistics
are per rank unless ``sync_bn=true`` on CUDA), validation counts are summed over ranks. The epoch loop, per-epoch
state file and resume are :func:`evaluation.linear.train_epochs`'.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.eval_loaders import EvalSplit, normalize
from evaluation.features import FrozenBackbone
from evaluation.linear import LinearHead, build_probe_optimizer, evaluate, summarize, train_epochs, wrap_ddp
from evaluation.semi_config import SemiConfig
from runtime import dist
from runtime.atomic import write_text_atomic
from runtime.config_loader import ConfigError


class FineTuner(nn.Module):
    """``head(backbone(x))``: uint8-normalised images (B, 3, S, S) -> pooled features (B, D) -> logits (B, C)."""

    def __init__(self, backbone: nn.Module, head: LinearHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def finetune(backbone: nn.Module, num_classes: int, train_loader, val_split: EvalSplit, cfg: SemiConfig, *,
             device: torch.device, mean, std, eval_batch_size: int, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = False, state_path: str | None = None, resume_key: str = "") -> dict:
    """Fine-tune ``backbone`` + a new linear classifier; returns the :func:`evaluation.linear.summarize` dict.

    Args:
        backbone: module mapping normalised images (B, 3, S, S) to pooled features (B, D); trained in place.
        train_loader: :func:`evaluation.eval_loaders.build_probe_train_loader` over the subset (per-rank batches).
        val_split: resize + center-crop validation split.
        mean, std: input normalisation of the checkpoint (RGB, [0, 1] scale).
        state_path / resume_key: per-epoch state file and the key that must match to resume it.
    """
    probe = FrozenBackbone(backbone, device, tuple(mean), tuple(std))
    dim = probe.feature_dim
    probe.release()
    model = FineTuner(backbone, LinearHead(dim, num_classes)).to(device).train()
    if cfg.sync_bn and dist.is_dist() and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = wrap_ddp(model, device)
    global_batch = cfg.batch_size // dist.world_size() * dist.world_size()
    lr_backbone, lr_classifier = cfg.peak_lrs(global_batch)
    opt = build_probe_optimizer([{"params": list(model.head.parameters()), "peak": lr_classifier},
                                 {"params": list(model.backbone.parameters()), "peak": lr_backbone}], cfg)

    def loss_fn(batch) -> torch.Tensor:
        x = normalize(batch.views[0], mean, std, device, channels_last)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = net(x)
        return F.cross_entropy(logits.float(), batch.labels.to(device))

    def evaluate_fn() -> dict[str, float]:
        frozen = FrozenBackbone(model.backbone, device, tuple(mean), tuple(std), autocast_dtype, channels_last)
        try:
            return evaluate(frozen, model.head, val_split, eval_batch_size)
        finally:
            frozen.release()  # back to train mode for the next epoch

    history = train_epochs(model, opt, train_loader, loss_fn, evaluate_fn, cfg, state_path=state_path,
                           resume_key=resume_key, tag="semi")
    res = summarize(history, cfg, lr_classifier, global_batch)
    res["peak_lr_backbone"] = lr_backbone
    return res


# ------------------------------------------------------------------ command line
_FLAGS = ("protocol", "train_perc", "epochs", "batch_size", "lr_backbone", "lr_classifier", "weight_decay", "seed")


def add_semi_parser(sub) -> None:
    """Register ``eval.py semi`` on the ``sub`` subparsers object."""
    p = sub.add_parser("semi", help="semi-supervised: fine-tune backbone + linear classifier on a labelled subset")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--weights", default="auto", choices=["auto", "student", "teacher", "finetune"],
                   help="backbone to fine-tune: auto = the method's evaluation choice (finetune = auto, accepted so "
                        "the official command line works)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", required=True, help="labelled training split: ImageFolder directory or .beton")
    p.add_argument("--val-data", required=True, help="labelled validation split: ImageFolder directory or .beton")
    p.add_argument("--subset", default=None,
                   help="file naming the labelled images, one file name per line (SimCLR's 1%%/10%% lists)")
    p.add_argument("--protocol", default=None, help="preset: auto, cw_rgp-1pct, intl-10pct, mvmr-1pct, ...")
    p.add_argument("--train-perc", type=float, default=None, help="percent drawn (class-balanced) without --subset")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch")
    p.add_argument("--lr-backbone", type=float, default=None)
    p.add_argument("--lr-classifier", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="subset draw and crop randomness")
    p.add_argument("--random-init", action="store_true", help="fine-tune a randomly initialised backbone instead")
    p.add_argument("--config", action="append", default=[], help="YAML (keys of evaluation.semi_config.SemiConfig)")
    p.add_argument("--num-classes", type=int, default=None, help="fail unless the data has this many classes")
    p.add_argument("--out", default=None, help="results JSON (default <run dir>/semi_<protocol>_<subset>.json)")
    p.add_argument("--no-resume", action="store_true", help="ignore a saved per-epoch state")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workers=4 eval_every=5 schedule=step")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    return [f"{k}={getattr(args, k)}" for k in _FLAGS if getattr(args, k) is not None]


def _select_subset(args, train: EvalSplit, cfg: SemiConfig, subset_out: str) -> list[int]:
    """Indices of the labelled subset; the names are written to ``subset_out`` (rank 0) to repeat the run."""
    from evaluation.subset import draw_balanced, read_subset, source_paths, subset_names, write_subset

    if args.subset:
        paths = source_paths(train)
        indices = read_subset(args.subset, paths)
    else:
        indices = draw_balanced(train.labels, cfg.train_perc, cfg.seed)
        paths = source_paths(train) if getattr(train, "folder", None) is not None or _has_tsv(train) else None
    if dist.is_main():
        if paths:
            names = subset_names(paths, indices)
        else:  # a .beton without its samples.tsv: the drawn subset can only be recorded as dataset indices
            names = [f"# dataset indices of {train.path} (no samples.tsv names its files)", *map(str, indices)]
        write_subset(subset_out, names)
    return indices


def _has_tsv(split: EvalSplit) -> bool:
    return os.path.isfile(os.path.splitext(split.path)[0] + ".samples.tsv")


def _outputs(args, ckpt: str, cfg: SemiConfig) -> tuple[str, str]:
    """(results JSON, subset file) paths; the name carries protocol, subset and init, so settings never collide."""
    drawn = f"{cfg.train_perc:g}pct-seed{cfg.seed}"
    subset = os.path.splitext(os.path.basename(args.subset))[0] if args.subset else drawn
    name = f"semi_{cfg.protocol}_{subset}{'_random_init' if args.random_init else ''}"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"{name}.json")
    return out, os.path.splitext(out)[0] + ".subset.txt"


def run_semi(args: argparse.Namespace) -> dict:
    """``eval.py semi``: load, pick the subset, fine-tune, write the results JSON (ConfigError on bad input)."""
    from engine.setup import autocast_dtype, pick_device, resolve_precision, seed_everything
    from evaluation.eval_loaders import build_eval_split, build_probe_train_loader, check_same_classes
    from evaluation.feature_cache import cache_key, data_fingerprint, file_fingerprint
    from evaluation.load import load_backbone
    from evaluation.report import print_linear_summary
    from evaluation.semi_config import load_semi_config
    from methods import build_method
    from runtime.checkpoint import resolve_checkpoint
    from runtime.config_loader import to_dict

    t0 = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    which = "auto" if args.weights == "finetune" else args.weights
    backbone, cfg = load_backbone(path, which)
    scfg = load_semi_config(cfg.method, args.config, _flag_overrides(args) + list(args.overrides))
    device = pick_device(args.device)
    dist.init_from_env(device.type)
    world = dist.world_size()
    if scfg.batch_size % world:
        raise ConfigError(f"batch_size: {scfg.batch_size} is not divisible by the {world} ranks")
    size, resize = scfg.crop_sizes(cfg.data.eval_size)
    workers = scfg.workers if scfg.workers >= 0 else cfg.data.workers
    train = build_eval_split(args.data, size, resize, workers, "--data")
    val = build_eval_split(args.val_data, size, resize, workers, "--val-data")
    num_classes = check_same_classes(train, val, args.num_classes)
    out, subset_out = _outputs(args, path, scfg)
    indices = _select_subset(args, train, scfg, subset_out)
    if args.random_init:
        seed_everything(cfg.train.seed)
        backbone = build_method(cfg).backbone_for_eval(which)
    precision = scfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and resolve_precision(cfg.model.precision, device) != "fp32" \
            else "fp32"
    seed_everything(scfg.seed)  # the classifier's initialisation
    loader = build_probe_train_loader(args.data, size=size, scale=scfg.train_scale, interpolation=scfg.interpolation,
                                      batch_size=scfg.batch_size // world, workers=workers, seed=scfg.seed,
                                      rank=dist.rank(), world_size=world, mean=cfg.data.mean, std=cfg.data.std,
                                      indices=indices)
    key = cache_key({"checkpoint": file_fingerprint(path), "weights": which, "random_init": args.random_init,
                     "world": world, "data": data_fingerprint(args.data), "val": data_fingerprint(args.val_data),
                     "subset": indices, "config": to_dict(scfg), "precision": precision})
    state = None if args.no_resume else os.path.splitext(out)[0] + ".state.pt"
    res = finetune(backbone, num_classes, loader, val, scfg, device=device, mean=cfg.data.mean, std=cfg.data.std,
                   eval_batch_size=cfg.eval.batch_size, autocast_dtype=autocast_dtype(precision, device),
                   channels_last=cfg.model.channels_last and device.type == "cuda", state_path=state, resume_key=key)
    res.update(kind="semi_eval", checkpoint=path, method=cfg.method, backbone=cfg.model.backbone, weights=which,
               init="random" if args.random_init else "pretrained", data=args.data, val_data=args.val_data,
               subset_file=subset_out, subset_images=len(indices), train_images=train.n, val_images=val.n,
               num_classes=num_classes, crop=[size, resize], precision=precision, world_size=world,
               seconds=time.perf_counter() - t0)
    if dist.is_main():
        write_text_atomic(out, json.dumps(res, indent=2))
    print_linear_summary(res, out)
    return res

