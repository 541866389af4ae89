"""``eval.py knn``: weighted kNN of a checkpoint's frozen backbone on labelled train/val splits.

Each split is an ImageFolder directory or a ``.beton`` file (:mod:`evaluation.eval_loaders`); both are read with
Resize(eval_size * 256/224) + CenterCrop(eval_size). With a :class:`FeatureCache` the features are shared with the
fast linear probe (same key: same checkpoint, weights, data and transform).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from engine.config import Config
from engine.setup import seed_everything
from evaluation.eval_loaders import build_eval_split, check_same_classes
from evaluation.feature_cache import FeatureCache
from evaluation.features import FrozenBackbone, embed_split
from evaluation.knn import knn_accuracies
from evaluation.load import load_backbone
from methods import build_method


def frozen_for(backbone: nn.Module, cfg: Config, device: torch.device,
               autocast_dtype: torch.dtype | None = None) -> FrozenBackbone:
    """The eval-mode backbone with the run's normalisation and memory format."""
    return FrozenBackbone(backbone, device, tuple(cfg.data.mean), tuple(cfg.data.std), autocast_dtype,
                          cfg.model.channels_last)


def knn_of_backbone(backbone, cfg: Config, train_path: str, val_path: str, device: torch.device,
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


def random_init_backbone(cfg: Config, which: str = "auto") -> nn.Module:
    """The backbone ``cfg``'s method evaluates (``which`` weights), as initialised from ``train.seed``: the baseline
    a trained backbone has to beat."""
    seed_everything(cfg.train.seed)
    return build_method(cfg).backbone_for_eval(which)


def knn_of_checkpoint(path: str, train_dir: str, val_dir: str, device: torch.device, which: str = "auto",
                      ks: tuple[int, ...] = (20,), temperature: float = 0.07, random_baseline: bool = False, *,
                      cache: FeatureCache | None = None, autocast_dtype: torch.dtype | None = None,
                      loaded: tuple[nn.Module, Config] | None = None) -> dict:
    """kNN of the checkpoint's backbone, and optionally of a random-init backbone of the same architecture.

    ``loaded``: the (backbone, config) of ``path`` if the caller has already loaded them.
    """
    backbone, cfg = loaded or load_backbone(path, which)
    result = {"pretrained": knn_of_backbone(backbone, cfg, train_dir, val_dir, device, ks, temperature, cache=cache,
                                            autocast_dtype=autocast_dtype)}
    if random_baseline:
        rand = random_init_backbone(cfg, which)
        result["random_init"] = knn_of_backbone(rand, cfg, train_dir, val_dir, device, ks, temperature,
                                                autocast_dtype=autocast_dtype)
    return result
