"""Optimiser construction and the per-step application of schedules, clipping and last-layer freezing."""

from __future__ import annotations

import torch
from torch import nn

from optim.config import OptimConfig
from optim.lars import LARS
from optim.param_groups import split_decay_groups
from optim.schedules import scaled_lr, warmup_cosine


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """SGD / LARS / AdamW over the decay/no-decay groups; lr and wd are set every step by :func:`apply_schedules`."""
    groups = split_decay_groups(model)
    # fused kernels exist for CUDA (and CPU for SGD/Adam in recent torch); foreach elsewhere
    fused = cfg.fused and device_type in ("cuda", "cpu")
    if cfg.name == "sgd":
        # foreach, not fused: torch's fused SGD fails when a parameter first gets a gradient after step 0 (the DINO
        # prototype layer frozen for the first epoch has no momentum buffer yet)
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, foreach=True)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, fused=fused)
    if cfg.name == "adam":  # coupled L2 weight decay (MV-MR, W-MSE-style recipes)
        return torch.optim.Adam(groups, lr=0.0, betas=cfg.betas, fused=fused)
    if cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


def apply_schedules(opt: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int,
                    global_batch: int) -> tuple[float, float]:
    """Write this step's lr and weight decay into every param group; returns (lr, wd)."""
    peak = scaled_lr(cfg.lr, global_batch, cfg.lr_scaling)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    lr = warmup_cosine(step, total_steps, warm, peak, cfg.min_lr)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    wd = warmup_cosine(step, total_steps, 0, cfg.weight_decay, wd_end)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0
    return lr, wd


def clip_gradients(model: nn.Module, max_norm: float, mode: str) -> None:
    """``per_param``: each gradient tensor is rescaled to norm <= max_norm independently (DINO ``clip_gradients``);
    ``global``: torch's global-norm clipping. No host sync in either mode."""
    if max_norm <= 0:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def cancel_last_layer_grads(model: nn.Module, names: tuple[str, ...], epoch: int, freeze_epochs: int) -> None:
    """Drop the gradients of the prototype layer during the first ``freeze_epochs`` epochs (DINO)."""
    if epoch >= freeze_epochs or not names:
        return
    for n, p in model.named_parameters():
        if any(s in n for s in names):
            p.grad = None
