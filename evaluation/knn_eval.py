"""``eval.py knn``: weighted kNN of a checkpoint's frozen backbone on ImageFolder train/val splits."""

from __future__ import annotations

import time

import torch

from evaluation.features import extract_features, image_folder
from evaluation.knn import knn_accuracy
from evaluation.load import load_backbone
from methods import build_method
from runtime.config import Config
from runtime.setup import seed_everything


def knn_of_backbone(backbone, cfg: Config, train_dir: str, val_dir: str, device: torch.device,
                    ks: tuple[int, ...] = (20,), temperature: float = 0.07) -> dict:
    """kNN top-1/top-5 for each k. Returns {'k20': {'top1':..., 'top5':...}, ..., 'seconds': ...}."""
    t0 = time.perf_counter()
    backbone = backbone.to(device)
    size = cfg.data.eval_size
    train_ds = image_folder(train_dir, size, "knn train split")
    val_ds = image_folder(val_dir, size, "knn val split")
    if train_ds.classes != val_ds.classes:
        raise ValueError(f"class folders differ between {train_dir} and {val_dir}")
    bank, bank_y = extract_features(backbone, train_ds, device, cfg.eval.batch_size, cfg.data.workers)
    q, q_y = extract_features(backbone, val_ds, device, cfg.eval.batch_size, cfg.data.workers)
    out: dict = {f"k{k}": knn_accuracy(bank, bank_y, q, q_y, k, temperature) for k in ks}
    out["seconds"] = time.perf_counter() - t0
    return out


def knn_of_checkpoint(path: str, train_dir: str, val_dir: str, device: torch.device, which: str = "auto",
                      ks: tuple[int, ...] = (20,), temperature: float = 0.07, random_baseline: bool = False) -> dict:
    """kNN of the checkpoint's backbone, and optionally of a random-init backbone of the same architecture."""
    backbone, cfg = load_backbone(path, which)
    result = {"pretrained": knn_of_backbone(backbone, cfg, train_dir, val_dir, device, ks, temperature)}
    if random_baseline:
        seed_everything(cfg.train.seed)
        rand = build_method(cfg).backbone_for_eval(which)
        result["random_init"] = knn_of_backbone(rand, cfg, train_dir, val_dir, device, ks, temperature)
    return result
