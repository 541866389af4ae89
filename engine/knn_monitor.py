"""kNN during training against the same backbone at initialisation (``train.knn_every``).

A run can lose the information its random initialisation already had while every logged statistic looks healthy
(DINO on real digit scans ended 6 kNN points below its random init with an effective rank of 12 and a teacher
entropy of 0.95, so no collapse criterion held; docs/small_data.md). The monitor measures what the user cares
about: weighted kNN of the evaluated backbone (``eval.features``) on ``eval.train_dir`` / ``eval.val_dir`` every
``knn_every`` epochs, next to the value of the same backbone before the first step. The logged ``knn_gain``
(points over the initialisation) is one of the collapse guard's statistics: ``knn_gain <= -train.collapse_knn_drop``
for ``train.collapse_patience`` consecutive kNN evaluations is reported as an "information" collapse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from evaluation.knn_backbone import knn_of_backbone
from runtime.logging import log


def knn_result(cfg, backbone: nn.Module, device: torch.device) -> dict:
    """Weighted kNN@``eval.knn_k`` (temperature ``eval.knn_t``) of ``backbone`` on ``eval.train_dir`` /
    ``eval.val_dir``: ``{'k20': {'top1': .., 'top5': ..}, 'seconds': ..}``. The backbone keeps its train/eval mode."""
    e = cfg.eval
    return knn_of_backbone(backbone, cfg, e.train_dir, e.val_dir, device, (e.knn_k,), e.knn_t)


class KnnMonitor:
    """Weighted kNN@``eval.knn_k`` top-1 of ``backbone_fn()`` now and at initialisation.

    Args:
        cfg: the run's Config (``eval.*`` splits, k and temperature; ``data.eval_size``).
        backbone_fn: returns the backbone to evaluate (B, 3, S, S) -> (B, D); called at each evaluation, so an EMA
            teacher is read as it is then.
        device: where the features are computed.
    """

    def __init__(self, cfg, backbone_fn: Callable[[], nn.Module], device: torch.device):
        self.cfg = cfg
        self.every = cfg.train.knn_every
        self.backbone_fn = backbone_fn
        self.device = device
        self.init_top1: float | None = None  # kNN of the backbone before the first step (kept in checkpoints)
        self.last: tuple[int, dict] | None = None  # (step, full result) of the latest evaluation

    def top1(self, step: int) -> float:
        res = knn_result(self.cfg, self.backbone_fn(), self.device)
        self.last = (step, res)
        return float(res[f"k{self.cfg.eval.knn_k}"]["top1"])

    def result_at(self, step: int) -> dict | None:
        """The full result of an evaluation made at ``step`` (the end-of-run kNN reuses it), else None."""
        return self.last[1] if self.last is not None and self.last[0] == step else None

    def measure_init(self) -> None:
        """Measure the initialisation's kNN (before step 0 of a fresh run)."""
        self.init_top1 = self.top1(0)
        log(f"[knn] at initialisation: kNN@{self.cfg.eval.knn_k} top-1 {self.init_top1:.2f} %")

    def due(self, epochs_done: int) -> bool:
        return self.every > 0 and epochs_done % self.every == 0

    def evaluate(self, step: int) -> dict[str, float]:
        """``{"knn_top1": .., "knn_gain": ..}`` (percent, points over the initialisation)."""
        top1 = self.top1(step)
        out = {"knn_top1": top1}
        if self.init_top1 is not None:
            out["knn_gain"] = top1 - self.init_top1
        return out

    def state_dict(self) -> dict:
        return {"init_top1": self.init_top1}

    def load_state_dict(self, state: dict) -> None:
        self.init_top1 = state.get("init_top1")
