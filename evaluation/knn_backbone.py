"""Weighted kNN of a backbone module on labelled train/val splits (no checkpoint, no engine imports).

The trainer's periodic kNN (``train.knn_every``) and ``eval.py knn`` both call :func:`knn_of_backbone`; this module
imports nothing from ``engine`` so that the trainer can use it without an import cycle (``cfg`` is read for
``data.eval_size/workers/mean/std``, ``model.channels_last`` and ``eval.batch_size`` only).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from evaluation.eval_loaders import build_eval_split, check_same_classes
from evaluation.feature_cache import FeatureCache
from evaluation.features import FrozenBackbone, embed_split
from evaluation.knn import knn_accuracies


def frozen_for(backbone: nn.Module, cfg, device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> FrozenBackbone:
    """The eval-mode backbone with the run's normalisation and memory format."""
    return FrozenBackbone(backbone, device, tuple(cfg.data.mean), tuple(cfg.data.std), autocast_dtype,
                          cfg.model.channels_last)


def knn_of_backbone(backbone, cfg, train_path: str, val_path: str, device: torch.device,
                    ks: tuple[int, ...] = (20,), temperature: float = 0.07, *, cache: FeatureCache | None = None,
                    autocast_dtype: torch.dtype | None = None) -> dict:
    """kNN top-1/top-5 for each k. Returns {'k20': {'top1':..., 'top5':...}, ..., 'seconds': ...}.

    Args:
        backbone: module mapping normalised images (B, 3, S, S) to pooled features (B, D).
        train_path / val_path: ImageFolder directory or .beton file (bank / queries).
        cache: optional feature cache (its ``base`` identifies the checkpoint, weights and precision).
        autocast_dtype: backbone autocast dtype (None = fp32).
    """
    t0 = time.perf_counter()
    size = cfg.data.eval_size
    resize = round(size * 256 / 224)
    workers = cfg.data.workers
    train = build_eval_split(train_path, size, resize, workers, "knn train split")
    val = build_eval_split(val_path, size, resize, workers, "knn val split")
    num_classes = check_same_classes(train, val)
    frozen = frozen_for(backbone, cfg, device, autocast_dtype)
    cache = cache or FeatureCache(None)
    parts = {"size": size, "resize": resize}
    bank = cache.get_or_compute("train_center", {**parts, "split": "train"},
                                lambda: _features(frozen, train, cfg.eval.batch_size), device, train_path)
    q = cache.get_or_compute("val", {**parts, "split": "val"},
                             lambda: _features(frozen, val, cfg.eval.batch_size), device, val_path)
    frozen.release()
    out: dict = knn_accuracies(bank["x"], bank["y"], q["x"], q["y"], ks, temperature, num_classes)
    out["seconds"] = time.perf_counter() - t0
    return out


def _features(frozen: FrozenBackbone, split, batch_size: int) -> dict[str, torch.Tensor]:
    x, y = embed_split(frozen, split, batch_size)
    return {"x": x, "y": y}
