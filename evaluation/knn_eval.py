"""``eval.py knn``: weighted kNN of a checkpoint's frozen backbone on labelled train/val splits.

Each split is an ImageFolder directory or a ``.beton`` file (:mod:`evaluation.eval_loaders`); both are read with
Resize(eval_size * 256/224) + CenterCrop(eval_size). With a :class:`FeatureCache` the features are shared with the
fast linear probe (same key: same checkpoint, weights, data and transform).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import Config
from engine.setup import seed_everything
from evaluation.feature_cache import FeatureCache
from evaluation.knn_backbone import knn_of_backbone
from evaluation.load import load_backbone
from methods import build_method


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
