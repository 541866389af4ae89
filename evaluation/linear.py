"""Standard linear probe: a linear layer on the frozen backbone's pooled features, trained over image loaders.

Protocol (see :mod:`evaluation.config` for the per-method presets): the backbone stays in eval mode (BN uses its
running statistics) and never receives gradients; each step embeds a batch of RandomResizedCrop + flip images under
``no_grad`` and trains ``Linear(D, C)`` (init N(0, 0.01), bias 0; optionally after a non-affine BatchNorm) with the
preset's optimiser and per-step schedule. After every ``eval_every`` epochs and the last one, top-1/top-5 on the
resize + center-crop validation split. Distributed: the head is wrapped in DDP, every rank trains on its shard of
the batch, validation counts are summed over ranks with ``all_reduce``. The head/optimiser state is written after
every epoch (atomically), so an interrupted run resumes at the next epoch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from evaluation.config import LinearConfig
from evaluation.eval_loaders import EvalSplit, rank_indices
from evaluation.features import FrozenBackbone
from runtime import dist
from runtime.checkpoint import atomic_save
from runtime.config_loader import to_dict
from runtime.logging import log


class LinearHead(nn.Module):
    """``Linear(D, C)`` on pooled features, optionally after ``BatchNorm1d(D, affine=False)``; (B, D) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int, norm: str = "none"):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False) if norm == "bn" else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def lr_at(step: int, steps_per_epoch: int, cfg: LinearConfig, peak: float, epochs: int | None = None) -> float:
    """lr of ``step``: linear warm-up from 0, then per-step cosine to 0 or x0.1 at each milestone epoch."""
    total = (epochs or cfg.epochs) * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return peak * step / warm
    if cfg.schedule == "step":
        return peak * 0.1 ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
    return 0.5 * peak * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))


def peak_lr(cfg: LinearConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.lr


def build_probe_optimizer(groups: list[dict], cfg: LinearConfig) -> torch.optim.Optimizer:
    """SGD (momentum), LARS (biases/norms excluded from the trust ratio) or Adam; lr is set every step."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=0.0, weight_decay=cfg.weight_decay)
    from optim.lars import LARS

    split = []
    for g in groups:
        params = list(g["params"])
        split.append({**g, "params": [p for p in params if p.ndim > 1]})
        split.append({**g, "params": [p for p in params if p.ndim <= 1], "lars_exclude": True})
    return LARS([g for g in split if g["params"]], lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, C) logits, (B,) labels -> float64 tensor [top-1 correct, top-5 correct, count]."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([top[:, 0].sum(), top.any(1).sum(), torch.tensor(labels.numel(), device=labels.device)]).double()


@torch.no_grad()
def evaluate(frozen: FrozenBackbone, head: nn.Module, split: EvalSplit, batch_size: int) -> dict[str, float]:
    """top-1 / top-5 (%) of ``head`` on ``split``; each rank scores a disjoint shard, counts are summed."""
    head.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=frozen.device)
    for images, labels in split.batches(rank_indices(split.n, dist.rank(), dist.world_size(), pad=False), batch_size):
        counts += topk_correct(head(frozen(images)), labels.to(frozen.device))
    dist.all_reduce_sum(counts)
    head.train()
    c1, c5, n = counts.tolist()
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


def wrap_ddp(head: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_dist():
        return head
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(head, device_ids=[device.index] if device.type == "cuda" else None)


def _resume(state_path: str | None, key: str, module: nn.Module, opt: torch.optim.Optimizer,
            tag: str = "linear") -> tuple[int, list]:
    """(first epoch to run, history so far) from a matching state file, else (0, [])."""
    if not state_path or not os.path.isfile(state_path):
        return 0, []
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        log(f"[{tag}] {state_path} belongs to another checkpoint/data/config; starting from epoch 0")
        return 0, []
    module.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    log(f"[{tag}] resuming from {state_path} at epoch {state['epoch'] + 1}")
    return state["epoch"] + 1, list(state["history"])


def train_epochs(module: nn.Module, opt: torch.optim.Optimizer, train_loader, loss_fn: Callable[[Any], torch.Tensor],
                 evaluate_fn: Callable[[], dict[str, float]], cfg, *, state_path: str | None = None,
                 resume_key: str = "", tag: str = "linear") -> list[dict]:
    """The epoch loop shared by the linear probe and semi-supervised fine-tuning; returns the per-epoch rows.

    Each step sets every param group's lr to :func:`lr_at` of its ``peak`` (groups carry their own peak: the
    fine-tuner has one for the backbone and one for the classifier), then ``loss_fn(batch)`` -> backward -> step.
    ``evaluate_fn()`` (top-1/top-5 on the validation split) runs every ``cfg.eval_every`` epochs and after the last.
    ``module`` (everything trained), the optimiser and the history are saved to ``state_path`` after every epoch
    (rank 0, atomically); a state file with the same ``resume_key`` is resumed at its next epoch.
    ``cfg`` needs ``epochs``, ``eval_every`` and the fields :func:`lr_at` reads.
    """
    spe = len(train_loader)
    device = next(module.parameters()).device
    start, history = _resume(state_path, resume_key, module, opt, tag)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(train_loader.epoch_iter(epoch), total=spe, desc=f"[{tag}] epoch {epoch + 1}/{cfg.epochs}",
                   disable=not dist.is_main(), leave=False, dynamic_ncols=True)
        for it, batch in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * spe + it, spe, cfg, g["peak"])
            loss = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        dist.all_reduce_mean(loss_sum)  # mean over ranks of per-rank means = the global-batch loss (equal shards)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / max(1, spe), "lr_end": opt.param_groups[0]["lr"]}
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            row.update(evaluate_fn())
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log(f"[{tag}] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if state_path and dist.is_main():
            atomic_save({"key": resume_key, "epoch": epoch, "head": module.state_dict(), "optimizer": opt.state_dict(),
                         "history": history, "config": to_dict(cfg)}, state_path)
    return history


def train_linear_probe(frozen: FrozenBackbone, train_loader, val_split: EvalSplit, num_classes: int,
                       cfg: LinearConfig, *, eval_batch_size: int, state_path: str | None = None,
                       resume_key: str = "") -> dict:
    """Train and evaluate the probe; returns ``{'epochs': [...], 'best': {...}, 'last': {...}, ...}`` (on all ranks).

    Args:
        frozen: the backbone to probe. train_loader: :func:`evaluation.eval_loaders.build_probe_train_loader`.
        val_split: resize + center-crop validation split. num_classes: C.
        state_path: where the head/optimiser state is saved after each epoch (None: not saved, no resume).
        resume_key: identifies checkpoint + data + config; a state file with another key is not resumed.
    """
    head = LinearHead(frozen.feature_dim, num_classes, cfg.head_norm).to(frozen.device)
    model = wrap_ddp(head, frozen.device)
    global_batch = cfg.batch_size // dist.world_size() * dist.world_size()
    peak = peak_lr(cfg, global_batch)
    opt = build_probe_optimizer([{"params": list(head.parameters()), "peak": peak}], cfg)

    def loss_fn(batch) -> torch.Tensor:
        with torch.no_grad():
            feats = frozen(batch.views[0])
        return F.cross_entropy(model(feats), batch.labels.to(frozen.device))

    history = train_epochs(head, opt, train_loader, loss_fn, lambda: evaluate(frozen, head, val_split, eval_batch_size),
                           cfg, state_path=state_path, resume_key=resume_key)
    return summarize(history, cfg, peak, global_batch)


def summarize(history: list[dict], cfg: LinearConfig, peak: float, global_batch: int) -> dict:
    """Best (by top-1) and last evaluated epoch plus the per-epoch rows."""
    evaluated = [r for r in history if "top1" in r]
    best = max(evaluated, key=lambda r: r["top1"])
    return {"protocol": cfg.protocol, "config": to_dict(cfg), "peak_lr": peak, "global_batch": global_batch,
            "epochs": history, "best": {k: best[k] for k in ("epoch", "top1", "top5")},
            "last": {k: evaluated[-1][k] for k in ("epoch", "top1", "top5")},
            "train_seconds": sum(r["seconds"] for r in history)}
