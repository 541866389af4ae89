"""Schedules as pure functions of the global step (or epoch): resuming needs only ``step``."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float,
                  start: float = 0.0) -> float:
    """Linear warm-up ``start -> peak`` over ``warmup_steps``, then cosine ``peak -> final`` until ``total_steps``.

    Matches DINO's per-iteration ``cosine_scheduler``: value at step ``i`` of the cosine part is
    ``final + 0.5 (peak - final)(1 + cos(pi * i / n))`` with ``n = total_steps - warmup_steps``.
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    n = max(1, total_steps - warmup_steps)
    i = min(step - warmup_steps, n)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * i / n))


def ema_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """Cosine increase of the EMA momentum from ``base`` to ``final`` (BYOL/DINO)."""
    return warmup_cosine(step, total_steps, 0, base, final)


def teacher_temperature(epoch: int, warmup: float, final: float, warmup_epochs: int) -> float:
    """DINO: ``linspace(warmup, final, warmup_epochs)[epoch]``, then ``final``."""
    if warmup_epochs <= 1 or epoch >= warmup_epochs:
        return final if epoch >= warmup_epochs or warmup_epochs == 0 else warmup
    return warmup + (final - warmup) * epoch / (warmup_epochs - 1)


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Peak lr for ``global_batch`` from the lr quoted for batch 256."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    if rule == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling: unknown rule {rule!r}; allowed values: 'linear', 'sqrt', 'none'")
