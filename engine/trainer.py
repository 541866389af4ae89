"""The generic training loop. Reads top to bottom; method differences live in ``methods/`` only.

Per step: batch -> device augment -> method forward (student + teacher + loss) -> backward -> clip / freeze ->
optimizer step -> EMA + loss-state update. Host syncs are marked ``# SYNC``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import yaml
from tqdm import tqdm

from engine.collapse import (
    CollapseError,
    CollapseGuard,
    CollapseMonitor,
    collapse_warning,
    distribution_entropies,
    mean_over_ranks,
)
from engine.config import Config, config_to_dict
from engine.knn_monitor import KnnMonitor
from engine.online_probe import build_online_probe
from engine.setup import autocast_ctx, make_augment, pick_device, resolve_precision, seed_everything
from methods import StepContext, build_method
from models.backbone import feature_dim
from models.parallelize import parallelize, unwrap
from optim.build import apply_schedules, build_optimizer, cancel_last_layer_grads, clip_gradients
from pipeline import build_loader
from runtime import checkpoint as ckpt
from runtime import dist, run_dir
from runtime.logging import MetricLogger, Throughput, log

# Config entries whose change makes a checkpoint's state unfit (other shape mismatches show up on loading it)
_STATE_SHAPING = ("method", "model.backbone", "optim.name")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # logged metrics, for tests and the final report


class Trainer:
    """Owns everything one run needs; ``fit()`` runs it. Built from a resolved :class:`Config`."""

    def __init__(self, cfg: Config, overwrite: bool = False, measure_only: bool = False):
        """``overwrite``: start fresh in a used ``train.out_dir`` (its contents are moved aside, see
        :mod:`runtime.run_dir`). ``measure_only``: build everything but leave ``train.out_dir`` alone (benchmarks;
        such a trainer cannot ``fit()``)."""
        # ============ environment ============
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        dist.init_from_env(self.device.type)
        asked, cfg.model.precision = cfg.model.precision, resolve_precision(cfg.model.precision, self.device)
        if asked != cfg.model.precision and dist.is_main():
            log(f"[setup] model.precision={asked} -> {cfg.model.precision} on {self.device.type}")
        seed_everything(cfg.train.seed + dist.rank())
        self.run_dir = cfg.train.out_dir
        self.run, resume_from, resume_state = None, None, None
        if not measure_only:  # claim the folder: refuse a used one, clean stale temporaries, pick the checkpoint
            self.run, resume_from, resume_state = run_dir.claim_on_main(self.run_dir, cfg.train.resume, overwrite)
        # ============ data ============
        self.loader = build_loader(cfg.data, seed=cfg.train.seed, rank=dist.rank(), world_size=dist.world_size(),
                                   device=self.device)
        self.steps_per_epoch = len(self.loader)
        if cfg.train.steps_per_epoch > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.steps_per_epoch)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * dist.world_size()
        self.augment = make_augment(cfg, self.device)
        # ============ model, loss state, optimizer ============
        self.method = build_method(cfg)
        self.model = parallelize(self.method, cfg.model, self.device)
        self.optimizer = build_optimizer(self.method.student, cfg.optim, self.device.type)
        self.collapse = None if cfg.model.compile else CollapseMonitor(self.method.student.backbone,
                                                                       cfg.data.batch_size)
        self.probe = build_online_probe(cfg, self.method, self.device)  # None unless train.online_probe
        self.guard = CollapseGuard.from_config(cfg.train, feature_dim(self.method.student.backbone))
        self.knn = KnnMonitor(cfg, lambda: self.method.backbone_for_eval(cfg.eval.features), self.device) \
            if cfg.train.knn_every else None
        fp16 = cfg.model.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.state = TrainState()
        if resume_from is not None:
            self._resume(resume_from, resume_state)
        if self.run is not None:  # after a successful resume: a refused one leaves the run's config as it was
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
        self.metrics = None if measure_only else MetricLogger(self.run_dir, cfg.train.tensorboard,
                                                              start_step=self.state.step)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """Atomically write a checkpoint of the whole run state (rank 0), prune old ones."""
        path = ckpt.checkpoint_path(self.run_dir, self.state.step)
        if self.run is not None:  # rank 0
            self.run.will_write(path)
            ckpt.atomic_save({
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "augment": self.augment.state_dict() if self.augment is not None else {},
                "rng": ckpt.rng_state(),
                "step": self.state.step,
                "config": config_to_dict(self.cfg),
                "meta": {"method": self.cfg.method, "backbone": self.cfg.model.backbone, "format": 1},
                **({"online_probe": self.probe.state_dict()} if self.probe is not None else {}),
                **({"knn": self.knn.state_dict()} if self.knn is not None else {}),
            }, path)
            self.run.prune(self.cfg.train.keep_last)
        dist.barrier()
        return path

    def _resume(self, path: str, state: dict | None) -> None:
        """Load the run state of checkpoint ``path`` (``state``: already loaded by the claim, or None); a checkpoint
        whose weights or optimizer do not fit this config is a CheckpointError listing the config keys that differ."""
        state = ckpt.load_checkpoint(path) if state is None else state
        saved, current = state["config"], config_to_dict(self.cfg)
        if ckpt.config_differences(saved, current, only=_STATE_SHAPING):
            raise ckpt.mismatch_error(path, saved, current, "method, backbone or optimizer")
        for what, key, load in (("model weights", "model", unwrap(self.model).load_state_dict),
                                ("optimizer state", "optimizer", self.optimizer.load_state_dict)):
            try:
                load(state[key])
            except (RuntimeError, ValueError, KeyError):
                raise ckpt.mismatch_error(path, saved, current, what) from None
        self.scaler.load_state_dict(state["scaler"])
        if self.augment is not None and state.get("augment"):
            self.augment.load_state_dict(state["augment"])
        if self.probe is not None and "online_probe" in state:
            self.probe.load_state_dict(state["online_probe"])
        if self.knn is not None and "knn" in state:
            self.knn.load_state_dict(state["knn"])
        ckpt.set_rng_state(state["rng"])
        self.state.step = int(state["step"])
        log(f"[resume] {path} at step {self.state.step}")

    # ------------------------------------------------------------------ one step
    def train_step(self, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lr, wd = apply_schedules(self.optimizer, cfg.optim, ctx.step, self.total_steps, self.steps_per_epoch,
                                 self.global_batch)
        batch = batch.to(self.device)
        if not batch.augmented:
            batch = self.augment(batch, step=ctx.step)  # reseeded from the step: resume needs no RNG state
        views = batch.views
        if cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        monitor = self._logs_at(ctx.step + 1)
        if monitor and self.collapse is not None:
            self.collapse.arm()
        if self.probe is not None:
            self.probe.arm()
        with autocast_ctx(cfg.model.precision, self.device):
            out = self.model(views, batch.n_global, ctx)
        probs = self.method.teacher_distribution(out) if monitor else None
        teacher = {} if probs is None else distribution_entropies(probs)  # device tensors, read at the log step
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_gradients(self.method.student, cfg.optim.clip_grad, cfg.optim.clip_mode)
        cancel_last_layer_grads(self.method.student, self.method.last_layer_names(), ctx.epoch,
                                cfg.optim.freeze_last_layer_epochs)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(out, ctx)
        logs = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.logs.items()}}
        logs["lr"], logs["wd"] = torch.tensor(lr), torch.tensor(wd)
        if monitor and self.collapse is not None:
            logs.update(self.collapse.stats())
        if self.probe is not None:  # after the SSL update, on features detached from it
            logs.update(self.probe.step(batch.labels, read=monitor))
        return {**logs, **teacher}

    def _logs_at(self, step: int) -> bool:
        """True when the loop logs after reaching ``step`` (counted after the increment)."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        cfg = self.cfg
        if self.metrics is None:
            raise RuntimeError("a Trainer built with measure_only=True has no claimed run directory; it cannot fit()")
        if self.knn is not None and self.state.step == 0:  # the kNN curve starts at the initialisation
            self.knn.measure_init()
            self._record({"knn_top1": self.knn.init_top1, "knn_gain": 0.0})
        self.model.train()
        start_epoch = self.state.step // self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not dist.is_main(), dynamic_ncols=True)
        meter = Throughput()
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for epoch in range(start_epoch, cfg.train.epochs):
            first = self.state.step - epoch * self.steps_per_epoch
            t_wait = time.perf_counter()
            for i, batch in enumerate(self.loader.epoch_iter(epoch, first), start=first):
                if i >= self.steps_per_epoch:
                    break
                data_wait = time.perf_counter() - t_wait
                ctx = StepContext(self.state.step, epoch, self.steps_per_epoch, self.total_steps)
                logs = self.train_step(batch, ctx)
                finite &= torch.isfinite(logs["loss"])  # device-side: no sync here
                self.state.step += 1
                meter.add(batch.batch_size * dist.world_size(), data_wait)
                bar.update(1)
                if self._logs_at(self.state.step):
                    self._log(logs, meter, finite, bar)
                if self.state.step % cfg.train.ckpt_every == 0:
                    self._check_finite(finite)
                    self._save_unless_collapsing()
                t_wait = time.perf_counter()
            self._check_finite(finite)
            if self.probe is not None:
                self._probe_val(bar)
            if self.knn is not None and self.knn.due(epoch + 1):
                self._knn_val(bar)
            self._save_unless_collapsing()
        bar.close()
        self.metrics.close()
        return self.state

    def _log(self, logs: dict, meter: Throughput, finite: torch.Tensor, bar) -> None:
        self._check_finite(finite)
        values = {k: float(v) for k, v in mean_over_ranks(logs).items()}  # SYNC: one host transfer per log interval
        ips, wait = meter.read()
        values.update(images_per_s=ips, data_wait=wait, epoch=self.state.step / self.steps_per_epoch)
        meter.reset()
        self._record(values)
        extra = {"rank": f"{values['feat_rank']:.1f}"} if "feat_rank" in values else {}
        if "probe_top1" in values:
            extra["probe"] = f"{values['probe_top1']:.1f}%"
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}", img_s=f"{ips:.0f}", **extra)
        self._check_collapse(values)

    def _record(self, values: dict[str, float]) -> None:
        """One row at the current step: in ``state.history`` and in ``metrics.jsonl`` (and TensorBoard)."""
        self.state.history.append({"step": self.state.step, **values})
        self.metrics.write(self.state.step, values)

    # ------------------------------------------------------------------ collapse guard
    def _check_collapse(self, values: dict[str, float]) -> None:
        """Feed the guard; warn once per collapse kind, log an event row, stop if ``train.stop_on_collapse``."""
        events = self.guard.observe(self.state.step, values)
        if not events:
            return
        log(collapse_warning(events, self.guard.patience))
        for e in events:
            self.metrics.event(self.state.step, e.row())
        if self.cfg.train.stop_on_collapse:
            last = ckpt.own_checkpoints(self.run_dir)
            where = last[0][1] if last else "none written yet"
            raise CollapseError(f"{', '.join(e.kind for e in events)} collapse at step {self.state.step} (since step "
                                f"{events[0].since}); stopped (train.stop_on_collapse=true). Last good checkpoint, "
                                f"written before the collapse began: {where}.")

    def _save_unless_collapsing(self) -> None:
        """Checkpoint, except while a collapse criterion holds with ``train.stop_on_collapse``: the newest checkpoint
        on disk then stays one from before the collapse began."""
        since = self.guard.suspect_since
        if since is not None and self.cfg.train.stop_on_collapse:
            log(f"[collapse] step {self.state.step}: no checkpoint (a collapse criterion holds since step {since})")
            return
        self.save()

    def _probe_val(self, bar) -> None:
        """Online probe on eval.val_dir at an epoch end, logged at the current step."""
        cfg = self.cfg
        values = self.probe.evaluate(self.method.student.backbone, cfg.eval.val_dir, cfg.data.eval_size, cfg.data.mean,
                                     cfg.data.std, cfg.eval.batch_size, cfg.data.workers, cfg.model.channels_last)
        self._record(values)
        bar.set_postfix(probe_val=f"{values['probe_val_top1']:.1f}%")

    def _knn_val(self, bar) -> None:
        """kNN of the evaluated backbone at an epoch end (``train.knn_every``), logged and fed to the guard."""
        values = self.knn.evaluate(self.state.step)
        self._record(values)
        bar.set_postfix(knn=f"{values['knn_top1']:.1f}%")
        self._check_collapse(values)

    def _check_finite(self, finite: torch.Tensor) -> None:
        if not bool(finite):  # SYNC
            last = ckpt.own_checkpoints(self.run_dir)
            where = last[0][1] if last else "none written yet"
            raise NonFiniteLossError(
                f"loss became NaN/inf before step {self.state.step}; training stopped. Last good checkpoint: {where}. "
                "Try a lower optim.lr, model.precision=fp32, or a larger optim.warmup_epochs.")


