"""A throw-away :class:`engine.trainer.Trainer` for measurements (batch-size and lr finders).

The run's recipe is kept (method, model, views, optimizer, loader); only what would leave traces is changed: the
output folder is a fresh temporary directory (the Trainer writes config.yaml / metrics.jsonl there, nothing is
written to ``train.out_dir``) that is deleted afterwards, no resume, no TensorBoard, no kNN. Steps are the Trainer's
own :meth:`~engine.trainer.Trainer.train_step` fed by its loader, as in ``train.py --benchmark``.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Iterator

from engine.config import Config
from methods import StepContext
from runtime.config_loader import ConfigError


@contextlib.contextmanager
def scratch_trainer(cfg: Config, batch_size: int | None = None) -> Iterator:
    """Yield a Trainer built from a copy of ``cfg`` in a temporary folder (removed on exit, even on errors)."""
    from engine.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    folder = tempfile.mkdtemp(prefix="flashssl-scratch-")
    cfg.train.out_dir, cfg.train.resume = folder, ""
    cfg.train.tensorboard, cfg.train.knn_at_end = False, False
    if batch_size is not None:
        cfg.data.batch_size = batch_size
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.model.train()
        yield trainer
    finally:
        if trainer is not None:
            trainer.metrics.close()
        shutil.rmtree(folder, ignore_errors=True)


def training_steps(trainer, n: int) -> Iterator[tuple[int, dict]]:
    """Yield ``(step, logs)`` for ``n`` real training steps, epoch after epoch of the trainer's loader (each epoch
    capped at ``train.steps_per_epoch`` like the real run)."""
    if trainer.steps_per_epoch < 1:
        cfg = trainer.cfg
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {cfg.data.train_path} has fewer images per rank "
                          "than one batch (the loaders drop the last partial batch)")
    step, epoch = 0, 0
    while step < n:
        for i, batch in enumerate(trainer.loader.epoch_iter(epoch, 0)):
            if step >= n or i >= trainer.steps_per_epoch:
                break
            ctx = StepContext(step, epoch, trainer.steps_per_epoch, trainer.total_steps)
            yield step, trainer.train_step(batch, ctx)
            step += 1
        epoch += 1
