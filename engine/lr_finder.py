"""``train.py --find-lr``: learning-rate range test (L. Smith, "Cyclical Learning Rates", 2017, section 3.3).

From a fresh model of the run's recipe, ``steps`` real training steps (the Trainer's ``train_step`` on its loader)
with the learning rate growing exponentially from ``lr_min`` to ``lr_max``: step i uses
``lr_min * (lr_max / lr_min) ** (i / (steps - 1))`` (times each param group's ``lr_scale``, as the schedule would).
The loss is smoothed by a bias-corrected exponential moving average (``beta``); the sweep stops early once the
smoothed loss exceeds ``diverge`` x its minimum or becomes NaN/inf. Suggested lr: the point of steepest descent of
the smoothed loss against log(lr), searched between the first 10 % of the steps and the minimum of the smoothed
loss (beyond the minimum the loss is already rising). ``min_loss_lr / 10`` is reported as a second, more
conservative rule. All lrs are the absolute values the optimizer used; ``config_lr`` converts one back to the
``optim.lr`` of the config (undoing ``optim.lr_scaling`` for the global batch). The sweep replaces the lr schedule
only (through an optimizer step pre-hook); weight decay, EMA and the method's own schedules run as in the first
``steps`` steps of the real run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from engine.config import Config
from engine.scratch_run import scratch_trainer, training_steps
from optim.schedules import scaled_lr
from runtime.config_loader import ConfigError
from runtime.logging import log


@dataclass
class LRSweep:
    lrs: list[float]  # the lr of every step taken
    losses: list[float]  # raw loss of every step
    smoothed: list[float]
    suggested_lr: float  # steepest descent
    min_loss_lr: float  # lr at the minimum of the smoothed loss
    stopped_early: bool
    seconds: float


def sweep_lrs(lr_min: float, lr_max: float, steps: int) -> np.ndarray:
    if not 0 < lr_min < lr_max:
        raise ConfigError(f"--lr-min/--lr-max: need 0 < lr_min < lr_max, got {lr_min} and {lr_max}")
    if steps < 10:
        raise ConfigError(f"--lr-steps: need at least 10 steps for a range test, got {steps}")
    return lr_min * (lr_max / lr_min) ** (np.arange(steps) / (steps - 1))


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected EMA: s_i = m_i / (1 - beta^(i+1)), m_i = beta m_{i-1} + (1 - beta) loss_i."""
    out, m = [], 0.0
    for i, x in enumerate(losses):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(lr of steepest descent of smoothed loss vs log lr before its minimum, lr at the minimum)."""
    s = np.asarray(smoothed)
    lo = max(1, len(s) // 10)
    best = int(np.argmin(s))
    if best - lo < 2:  # the loss never went down: fall back to the minimum itself
        return float(lrs[best]), float(lrs[best])
    grad = np.gradient(s[lo:best + 1], np.log(np.asarray(lrs[lo:best + 1])))
    return float(lrs[lo + int(np.argmin(grad))]), float(lrs[best])


def lr_range_test(cfg: Config, lr_min: float = 1e-6, lr_max: float = 1.0, steps: int = 200, beta: float = 0.9,
                  diverge: float = 4.0) -> LRSweep:
    """Run the sweep (module docstring) and return the curve and suggestions; nothing is written to disk."""
    schedule = sweep_lrs(lr_min, lr_max, steps)
    t0 = time.perf_counter()
    lrs: list[float] = []
    losses: list[float] = []
    stopped = False
    with scratch_trainer(cfg) as trainer:
        current = {"lr": float(schedule[0])}

        def set_lr(opt, args, kwargs):
            for g in opt.param_groups:
                g["lr"] = current["lr"] * g.get("lr_scale", 1.0)

        handle = trainer.optimizer.register_step_pre_hook(set_lr)
        try:
            for i, logs in _steps_with_lr(trainer, schedule, current):
                loss = float(logs["loss"])  # SYNC: once per step, the curve needs every value
                lrs.append(float(schedule[i]))
                losses.append(loss)
                s = smooth(losses, beta)
                if not math.isfinite(loss) or (i > 5 and s[-1] > diverge * min(s)):
                    stopped = True
                    break
                if (i + 1) % max(1, steps // 10) == 0:
                    log(f"[find-lr] step {i + 1}/{steps}: lr {lrs[-1]:.3g} loss {loss:.4f} (smoothed {s[-1]:.4f})")
        finally:
            handle.remove()
    finite = [x if math.isfinite(x) else float("nan") for x in losses]
    n = len(finite) - (1 if stopped and not math.isfinite(losses[-1]) else 0)
    if n < 3:
        raise ConfigError(f"--find-lr: the loss diverged within {n} steps; lower --lr-min (now {lr_min})")
    smoothed = smooth(finite[:n], beta)
    steep, at_min = suggest(lrs[:n], smoothed)
    return LRSweep(lrs[:n], finite[:n], smoothed, steep, at_min, stopped, time.perf_counter() - t0)


def _steps_with_lr(trainer, schedule: np.ndarray, current: dict):
    for i, logs in training_steps(trainer, len(schedule)):
        yield i, logs
        if i + 1 < len(schedule):
            current["lr"] = float(schedule[i + 1])


def config_lr(lr: float, cfg: Config, world_size: int = 1) -> float:
    """The ``optim.lr`` whose scaled peak (``optim.lr_scaling`` at the global batch) is the absolute ``lr``."""
    return lr / scaled_lr(1.0, cfg.data.batch_size * world_size, cfg.optim.lr_scaling)


def plot_sweep(sweep: LRSweep, out: str, title: str = ""):
    """Raw and smoothed loss against lr (log x), the suggestion marked; writes ``out`` (PNG), returns the Figure."""
    from engine.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, width=11.0, row_height=4.5)
    ax.plot(sweep.lrs, sweep.losses, label="loss", alpha=0.35, linewidth=1.0)
    ax.plot(sweep.lrs, sweep.smoothed, label="smoothed loss", linewidth=1.6)
    ax.axvline(sweep.suggested_lr, color="tab:red", linestyle="--", label=f"steepest descent {sweep.suggested_lr:.2g}")
    ax.axvline(sweep.min_loss_lr / 10, color="tab:green", linestyle=":",
               label=f"min-loss lr / 10 = {sweep.min_loss_lr / 10:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (absolute, per step)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out)
    return fig
