"""The contract between the generic trainer and one SSL method.

The trainer never branches on the method. Per step it calls, in order::

    out = method(views, n_global, ctx)            # student (+ teacher) forward and the loss   -> StepOutput
    out.loss.backward(); optimizer.step()
    method.after_step(out, ctx)                    # EMA teacher update, then loss-state updates (centers, queues)

A method is an ``nn.Module`` holding ``student`` (trained; contains backbone + heads), an optional ``teacher``
(EMA copy, never trained by the optimiser) and its loss modules with their state buffers, so one
``state_dict()`` checkpoints everything. Model code holds no parallelism; ``models.parallelize`` wraps it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from models.ema import ema_update


@dataclass
class StepContext:
    """Where the run is. Every schedule is a pure function of these numbers (so resume needs only ``step``)."""

    step: int  # global optimisation step, 0-based
    epoch: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class StepOutput:
    """What a method's forward returns.

    Attributes:
        loss: scalar tensor to back-propagate.
        logs: scalar tensors to log (detached; read on the host only every ``log_every`` steps).
        state: detached tensors the state update needs (e.g. teacher logits for the DINO center, keys to enqueue).
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class SSLMethod(nn.Module):
    """Base class. Subclasses set ``Config`` (the dataclass of the ``ssl`` config section) and implement
    ``forward``; methods with state override ``update_state``; methods with a teacher override ``ema_momentum``."""

    Config: ClassVar[type]
    #: which weights evaluation uses by default ("teacher" for DINO/SCFS/ReSSL-style EMA methods)
    eval_weights: ClassVar[str] = "student"
    #: the linear-probe preset of ``evaluation.config.PROTOCOLS`` that ``eval.py linear`` uses for this method
    #: (``protocol=auto``); every method names its own: there is no fallback
    eval_protocol: ClassVar[str]

    student: nn.Module
    teacher: nn.Module | None

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:  # pragma: no cover
        """Args: views — V tensors (B, 3, H_v, W_v) normalised, globals first. Returns the step's loss."""
        raise NotImplementedError

    # ------------------------------------------------------------------ after the optimiser step
    def ema_momentum(self, ctx: StepContext) -> float:
        """Teacher EMA momentum at ``ctx.step`` (only used when ``teacher`` is not None)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_state(self, out: StepOutput, ctx: StepContext) -> None:
        """Update loss state (centers, queues) from ``out.state``. Default: stateless."""

    @torch.no_grad()
    def after_step(self, out: StepOutput, ctx: StepContext) -> None:
        """EMA update of the teacher, then the loss-state update. Called by the trainer after ``optimizer.step``."""
        if getattr(self, "teacher", None) is not None:
            ema_update(self.teacher, self.student, self.ema_momentum(ctx))
        self.update_state(out, ctx)

    # ------------------------------------------------------------------ evaluation
    def backbone_for_eval(self, which: str = "auto") -> nn.Module:
        """The backbone whose pooled features are evaluated: ``teacher``, ``student`` or ``auto`` (the method's
        official choice, :attr:`eval_weights`)."""
        which = self.eval_weights if which == "auto" else which
        if which == "teacher":
            if getattr(self, "teacher", None) is None:
                raise ValueError(f"{type(self).__name__} has no teacher; evaluate the student instead")
            return self.teacher.backbone
        if which != "student":
            raise ValueError(f"unknown weights {which!r}; allowed values: 'auto', 'student', 'teacher'")
        return self.student.backbone

    @torch.no_grad()
    def teacher_distribution(self, out: StepOutput) -> torch.Tensor | None:
        """The distribution the teacher's targets of this step are drawn from, (..., K) with rows summing to 1, for
        the collapse guard (``engine/collapse.py``); called before ``after_step`` on log steps only. None: the
        method has no teacher targets of this kind."""
        return None

    def last_layer_names(self) -> tuple[str, ...]:
        """Substrings of parameter names frozen during the first ``optim.freeze_last_layer_epochs`` epochs."""
        return ()

    @classmethod
    def check_config(cls, cfg) -> None:
        """Method-specific validation of the resolved config (views, batch size ...). Raise ConfigError."""
