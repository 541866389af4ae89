"""Fast linear probe (``eval.py linear --fast``): extract frozen features once, train on the cached tensors.

The expensive part of the standard probe is running the backbone on every training image in every epoch. Here the
backbone runs once per image for the center crop (the validation transform) plus ``fast.copies`` times for
RandomResizedCrop + flip copies (each copy = one more extraction pass, a fixed sample of the augmentation the
standard protocol redraws every epoch). The features are cached on disk (:mod:`evaluation.feature_cache`), so
re-running with other probe hyperparameters costs only the classifier training, which runs on the device on
mini-batches of the cached matrix: the same head, optimiser, lr (scaled to ``fast.batch_size``) and schedule as the
standard protocol, with ``fast.epochs`` passes over the cache.

Several heads with lr multipliers ``fast.lr_grid`` train side by side (one parameter group each, the same batches),
so a learning-rate sweep costs one run. Distributed: extraction is sharded over ranks and gathered; every rank then
trains the same heads on the same full cache with the same seed (no communication; only rank 0 writes results).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from evaluation.config import LinearConfig
from evaluation.eval_loaders import EvalSplit
from evaluation.feature_cache import FeatureCache
from evaluation.features import FrozenBackbone, embed_loader_epoch, embed_split
from evaluation.linear import LinearHead, build_probe_optimizer, lr_at, peak_lr, topk_correct
from runtime.config_loader import to_dict
from runtime.logging import log


def cached_probe_features(frozen: FrozenBackbone, train_split: EvalSplit, val_split: EvalSplit, make_aug_loader,
                          cfg: LinearConfig, cache: FeatureCache, batch_size: int) -> dict[str, torch.Tensor]:
    """Train features (center crops, then ``fast.copies`` augmented passes) and val features, via the cache.

    Returns {'train_x': (M, D), 'train_y': (M,), 'val_x': (N_val, D), 'val_y': (N_val,)} on the device.
    ``make_aug_loader()`` builds the RandomResizedCrop + flip loader (only called when copies are requested and
    missing from the cache). Each piece has its own cache entry (shared with ``eval.py knn`` for the center crops),
    so adding copies re-uses what was extracted before.
    """
    dev = frozen.device
    crop = {"size": val_split.size, "resize": val_split.resize}
    val = cache.get_or_compute("val", {**crop, "split": "val"},
                               lambda: _pack(*embed_split(frozen, val_split, batch_size)), dev, val_split.path)
    center = cache.get_or_compute("train_center", {**crop, "split": "train"},
                                  lambda: _pack(*embed_split(frozen, train_split, batch_size)), dev, train_split.path)
    xs, ys = [center["x"]], [center["y"]]
    loader = None
    for c in range(cfg.fast.copies):
        def extract(c: int = c) -> dict[str, torch.Tensor]:
            nonlocal loader
            loader = loader or make_aug_loader()
            return _pack(*embed_loader_epoch(frozen, loader, epoch=c))

        parts = {"split": "train", "aug_copy": c, "size": val_split.size, "train_scale": list(cfg.train_scale),
                 "interpolation": cfg.interpolation, "seed": cfg.seed, "batch": batch_size}
        aug = cache.get_or_compute(f"train_aug{c}", parts, extract, dev, train_split.path)
        xs.append(aug["x"])
        ys.append(aug["y"])
    return {"train_x": torch.cat(xs), "train_y": torch.cat(ys), "val_x": val["x"], "val_y": val["y"]}


def _pack(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"x": x, "y": y}


def train_on_features(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                      num_classes: int, cfg: LinearConfig) -> dict:
    """Train one head per lr multiplier on cached features; evaluate every ``eval_every`` epochs.

    Args:
        train_x: (M, D) float features; train_y: (M,) int64. val_x: (N, D); val_y: (N,).
    Returns:
        {'heads': {'lr_x1': {'best':..., 'last':..., 'lr':...}, ...}, 'epochs': rows of the protocol head, ...}
    """
    fast, dev = cfg.fast, train_x.device
    heads = [LinearHead(train_x.shape[1], num_classes, cfg.head_norm).to(dev) for _ in fast.lr_grid]
    peak = peak_lr(cfg, fast.batch_size)
    opt = build_probe_optimizer([{"params": list(h.parameters()), "mult": m} for h, m in zip(heads, fast.lr_grid)], cfg)
    m = train_x.shape[0]
    spe = math.ceil(m / fast.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[list[dict]] = [[] for _ in heads]
    for epoch in range(fast.epochs):
        perm = torch.randperm(m, generator=gen).to(dev)
        for it, idx in enumerate(perm.split(fast.batch_size)):
            lr = lr_at(epoch * spe + it, spe, cfg, peak, epochs=fast.epochs)
            for g in opt.param_groups:
                g["lr"] = lr * g["mult"]
            x, y = train_x[idx].float(), train_y[idx]
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if (epoch + 1) % cfg.eval_every == 0 or epoch == fast.epochs - 1:
            for h, r in zip(heads, rows):
                r.append({"epoch": epoch, **evaluate_on_features(h, val_x, val_y)})
    return _summarize_heads(rows, cfg, peak)


@torch.no_grad()
def evaluate_on_features(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> dict:
    """top-1 / top-5 (%) of ``head`` on cached (N, D) features."""
    head.eval()
    counts = sum(topk_correct(head(xc.float()), yc) for xc, yc in zip(x.split(chunk), y.split(chunk)))
    head.train()
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def _summarize_heads(rows: list[list[dict]], cfg: LinearConfig, peak: float) -> dict:
    heads = {}
    for mult, r in zip(cfg.fast.lr_grid, rows):
        best = max(r, key=lambda row: row["top1"])
        heads[f"lr_x{mult:g}"] = {"lr": peak * mult, "best": best, "last": r[-1]}
    ref = cfg.fast.lr_grid.index(1.0) if 1.0 in cfg.fast.lr_grid else 0
    chosen = max(heads, key=lambda k: heads[k]["best"]["top1"])
    protocol_head = list(heads)[ref]
    return {"protocol": cfg.protocol, "config": to_dict(cfg), "peak_lr": peak, "epochs": rows[ref],
            "best": heads[protocol_head]["best"], "last": heads[protocol_head]["last"], "heads": heads,
            "best_of_grid": {"head": chosen, **heads[chosen]["best"]}}


def fast_linear_probe(frozen: FrozenBackbone, train_split: EvalSplit, val_split: EvalSplit, make_aug_loader,
                      num_classes: int, cfg: LinearConfig, cache: FeatureCache, batch_size: int) -> dict:
    """Extract (or load) the cached features, then train the heads; the result includes both phases' seconds."""
    t0 = time.perf_counter()
    feats = cached_probe_features(frozen, train_split, val_split, make_aug_loader, cfg, cache, batch_size)
    t1 = time.perf_counter()
    pieces = 2 + cfg.fast.copies
    log(f"[fast] features: train {tuple(feats['train_x'].shape)} val {tuple(feats['val_x'].shape)} "
        f"({t1 - t0:.1f} s; {len(cache.hits)} of {pieces} pieces from the cache)")
    res = train_on_features(feats["train_x"], feats["train_y"], feats["val_x"], feats["val_y"], num_classes, cfg)
    res.update(feature_seconds=t1 - t0, train_seconds=time.perf_counter() - t1, cache_hits=list(cache.hits),
               train_features=int(feats["train_x"].shape[0]))
    return res
