"""Collapse monitor: how spread out the student's backbone features are, logged with the loss.

A falling loss says nothing about collapse (DINO's loss sits at ``log K`` when its teacher has gone uniform, a
collapsed ReSSL at ``log(queue size)``), so the trainer also logs two statistics of the pooled backbone features of
the step's first view:

* ``feat_rank``: effective rank (Roy & Vetterli 2007) of the centred features, ``exp(entropy(s^2 / sum s^2))`` of
  their singular values ``s``: between 1 (every image on one line) and ``min(B, D)``;
* ``feat_std``: mean over dimensions of the batch standard deviation of the L2-normalised features (SimSiam's
  collapse indicator): 0 for a constant output, about ``1/sqrt(D)`` for features spread over the sphere.

The features come from a forward hook on the backbone's pooling module (timm's ``global_pool``, which every path
goes through, SCFS's ``forward_head`` included; the backbone itself when it has none, e.g. ViTs) that keeps a
reference to the first output of a step in which the monitor is armed (only the logging steps), so other steps pay
nothing. Off with ``model.compile`` (a Python hook inside a compiled graph would break or re-trace it).

Teacher-student methods (DINO, SCFS, ReSSL, ReSA) also hand the trainer the distribution their teacher's targets
are drawn from (``SSLMethod.teacher_distribution``: centred and sharpened for DINO, the relation over the queue for
ReSSL, the Sinkhorn assignment for ReSA), of which two entropies are logged, as fractions of ``log K``:

* ``teacher_entropy``: mean per-sample entropy. Near 1: every target is uniform (DINO's "uniform collapse", the loss
  settles at ``log K`` and the student learns nothing);
* ``teacher_batch_entropy``: entropy of the batch-mean distribution. Near 0: every sample gets the same one-hot
  target (the "one-hot" / dimensional collapse centering exists to prevent).

:class:`CollapseGuard` reads these statistics on the host at log steps (the only place they are synchronised) and
reports a criterion that held for ``train.collapse_patience`` consecutive log steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from runtime import dist


@torch.no_grad()
def effective_rank(feats: torch.Tensor) -> torch.Tensor:
    """Effective rank of the centred rows of ``feats`` (N, D). Returns a scalar fp32 tensor (NaN if not finite).

    The squared singular values are taken as the eigenvalues of the (N, N) Gram matrix in float64 (``eigvalsh``
    converges on the rank-deficient matrices collapse produces, where LAPACK's SVD can fail).
    """
    x = feats.detach().double()
    finite = torch.isfinite(x).all()  # branch-free below: no host sync inside the training step
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    x = x - x.mean(dim=0, keepdim=True)
    s2 = torch.linalg.eigvalsh(x @ x.T).clamp_min(0)
    p = s2 / s2.sum().clamp_min(1e-300)  # all zero (constant features): p = 0, entropy 0, rank 1
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    entropy = torch.where(finite, entropy, torch.full_like(entropy, float("nan")))
    return torch.exp(entropy).float()


@torch.no_grad()
def normalized_std(feats: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension batch std of the L2-normalised rows of ``feats`` (N, D). Returns a scalar tensor."""
    z = torch.nn.functional.normalize(feats.detach().float(), dim=-1)
    return z.std(dim=0).mean()


@torch.no_grad()
def distribution_entropies(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropies of the rows of ``probs`` (..., K) (each row a distribution over K outcomes), in float64.

    Returns scalar fp32 tensors, as fractions of ``log K`` (so 1 = uniform, 0 = one-hot):
    ``teacher_entropy`` = mean over rows of H(p_row); ``teacher_batch_entropy`` = H(mean over rows of p_row).
    """
    k = probs.shape[-1]
    p = probs.detach().reshape(-1, k).double()
    log_k = math.log(k) if k > 1 else 1.0

    def entropy(q: torch.Tensor) -> torch.Tensor:  # 0 log 0 = 0
        return -(q * torch.log(q.clamp_min(1e-300))).sum(dim=-1)

    return {"teacher_entropy": (entropy(p).mean() / log_k).float(),
            "teacher_batch_entropy": (entropy(p.mean(dim=0)) / log_k).float()}


def pooled_feature_module(backbone: nn.Module) -> nn.Module:
    """The module whose output is the pooled (N, D) feature: timm's ``global_pool`` module, else the backbone."""
    pool = getattr(backbone, "global_pool", None)
    return pool if isinstance(pool, nn.Module) else backbone


class PooledFeatureTap:
    """Keeps the first ``rows`` rows of ``backbone``'s next pooled output (N, D), detached, after each ``arm()``.

    A forward hook on the pooling module: it reads the features of the forward the step runs anyway (no extra
    forward, no gradient path). Rows are view-major in every method, so the first ``rows`` rows are the first view's
    batch. ``take()`` returns them (None when the hook saw nothing, e.g. a backbone that returns feature maps).
    """

    def __init__(self, backbone: nn.Module, rows: int):
        self.rows = rows
        self._armed = False
        self._feats: torch.Tensor | None = None
        self._handle = pooled_feature_module(backbone).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if self._armed and self._feats is None and isinstance(output, torch.Tensor) and output.dim() == 2:
            self._feats = output.detach()[: self.rows]

    def arm(self) -> None:
        self._armed, self._feats = True, None

    def take(self) -> torch.Tensor | None:
        feats, self._armed, self._feats = self._feats, False, None
        return feats

    def close(self) -> None:
        self._handle.remove()


class CollapseMonitor(PooledFeatureTap):
    """Collapse statistics of the first view's pooled features: ``arm()`` before a logging step's forward,
    ``stats()`` after it (empty when the hook saw nothing)."""

    def stats(self) -> dict[str, torch.Tensor]:
        feats = self.take()
        if feats is None or feats.shape[0] < 2:
            return {}
        return {"feat_rank": effective_rank(feats), "feat_std": normalized_std(feats)}


@dataclass(frozen=True)
class CollapseEvent:
    """A collapse criterion that held for ``patience`` consecutive log steps, from log step ``since`` to ``step``."""

    kind: str  # "uniform", "one_hot", "dimensional", "constant" or "information"
    step: int
    since: int
    value: float  # the statistic at ``step``
    message: str

    def row(self) -> dict:
        """The ``metrics.jsonl`` event row (without ``step``)."""
        return {"event": "collapse", "kind": self.kind, "since": self.since, "value": self.value}


#: kind -> (statistic, "high"/"low" side that signals collapse, what it means, knobs that usually fix it)
CRITERIA: dict[str, tuple[str, str, str, str]] = {
    "uniform": (
        "teacher_entropy", "high",
        "the teacher's targets are nearly uniform (mean per-sample entropy {v:.3f} x log K); the student is pulled "
        "towards a constant output and the loss sits near log K",
        "a lower teacher temperature (ssl.teacher_temp, ssl.warmup_teacher_temp), a lower EMA momentum so the teacher "
        "follows the student (ssl.momentum_teacher / ssl.momentum), a higher optim.lr or a shorter warm-up, fewer "
        "prototypes (ssl.out_dim)"),
    "one_hot": (
        "teacher_batch_entropy", "low",
        "every sample gets the same target (entropy of the batch-mean teacher distribution {v:.3f} x log K)",
        "a higher teacher temperature, faster centering (a lower ssl.center_momentum, or ssl.centering=sinkhorn), a "
        "lower optim.lr, a higher EMA momentum"),
    "dimensional": (
        "feat_rank", "low",
        "the backbone features span only ~{v:.1f} directions (effective rank of the batch)",
        "a lower optim.lr or a longer optim.warmup_epochs, a larger head (ssl.hidden_dim, ssl.bottleneck_dim, "
        "ssl.out_dim), the teacher temperature and centering momentum of a published recipe, weight decay"),
    "constant": (
        "feat_std_ratio", "low",
        "the backbone features are nearly constant (per-dimension std of the unit features {v:.3f} x 1/sqrt(D))",
        "a lower optim.lr, a longer warm-up, a higher EMA momentum, a published recipe's teacher temperature"),
    "information": (
        "knn_gain", "low",
        "the evaluated backbone's kNN on eval.val_dir is {v:+.1f} points against the same backbone at initialisation: "
        "training is destroying information the random init had (train.knn_every)",
        "a small-data recipe for small data (configs/exp/<method>_small.yaml), a lower optim.lr, stronger crops (a "
        "lower views[].scale minimum), a longer run before judging an EMA teacher (it is mostly its initialisation "
        "for the first 1/(1 - momentum) steps), local crops (DINO on small real data learned only with them; "
        "docs/small_data.md)"),
}


class CollapseGuard:
    """Host-side check of the logged collapse statistics, one call per log step.

    A criterion (see :data:`CRITERIA`) "holds" when its statistic crosses its threshold; a threshold of ``None``
    switches a criterion off. ``observe`` returns the criteria that just held for ``patience`` consecutive log steps
    (each kind at most once per run); ``suspect_since`` is the first log step of the earliest streak in progress.

    Args:
        patience: consecutive log steps a criterion must hold.
        uniform_entropy: ``teacher_entropy`` >= this (fraction of log K) is uniform collapse.
        onehot_entropy: ``teacher_batch_entropy`` <= this (fraction of log K) is one-hot collapse.
        min_rank: ``feat_rank`` <= this is dimensional collapse.
        min_std_ratio: ``feat_std * sqrt(D)`` <= this is complete (constant-output) collapse.
        feat_dim: D, the width of the monitored features.
    """

    def __init__(self, patience: int, uniform_entropy: float | None, onehot_entropy: float | None,
                 min_rank: float | None, min_std_ratio: float | None, feat_dim: int, knn_drop: float | None = None):
        self.patience = patience
        self.thresholds = {"uniform": uniform_entropy, "one_hot": onehot_entropy, "dimensional": min_rank,
                           "constant": min_std_ratio, "information": None if knn_drop is None else -knn_drop}
        self.feat_dim = feat_dim
        self.streak: dict[str, tuple[int, int]] = {}  # kind -> (first log step of the streak, length)
        self.reported: set[str] = set()

    @classmethod
    def from_config(cls, train_cfg, feat_dim: int) -> CollapseGuard:
        """From the ``train.collapse_*`` keys; a threshold of 0 switches its criterion off."""
        t = train_cfg
        return cls(t.collapse_patience, t.collapse_uniform_entropy or None, t.collapse_onehot_entropy or None,
                   t.collapse_min_rank or None, t.collapse_min_std_ratio or None, feat_dim, t.collapse_knn_drop or None)

    def _holds(self, kind: str, values: dict[str, float]) -> tuple[bool | None, float]:
        """(whether the criterion holds, its statistic); None when ``values`` does not carry the statistic."""
        key, side = CRITERIA[kind][:2]
        if key == "feat_std_ratio" and "feat_std" in values:
            values = {**values, key: values["feat_std"] * math.sqrt(self.feat_dim)}
        thr, v = self.thresholds[kind], values.get(key)
        if v is None:
            return None, float("nan")
        if thr is None or not math.isfinite(v):
            return False, float("nan")
        return (v >= thr if side == "high" else v <= thr), v

    def observe(self, step: int, values: dict[str, float]) -> list[CollapseEvent]:
        """Feed one row of statistics. A criterion whose statistic is missing from ``values`` keeps its streak (the
        kNN gain arrives every ``train.knn_every`` epochs, between log rows that do not carry it)."""
        events = []
        for kind in CRITERIA:
            held, v = self._holds(kind, values)
            if held is None:
                continue
            if not held:
                self.streak.pop(kind, None)
                continue
            since, n = self.streak.get(kind, (step, 0))
            self.streak[kind] = (since, n + 1)
            if n + 1 >= self.patience and kind not in self.reported:
                self.reported.add(kind)
                events.append(CollapseEvent(kind, step, since, v, CRITERIA[kind][2].format(v=v)))
        return events

    @property
    def suspect_since(self) -> int | None:
        return min((since for since, _ in self.streak.values()), default=None)


def collapse_warning(events: list[CollapseEvent], patience: int) -> str:
    """One warning text for the events of one log step: which collapse, since when, and the usual fixes."""
    lines = [f"[collapse] WARNING at step {events[0].step}: training has collapsed (held for {patience} log steps "
             f"since step {events[0].since}):"]
    for e in events:
        lines.append(f"  - {e.kind} collapse: {e.message}. Usually fixed by: {CRITERIA[e.kind][3]}.")
    return "\n".join(lines)


class CollapseError(RuntimeError):
    """Raised with ``train.stop_on_collapse=true`` when a collapse criterion tripped; train.py exits with code 2."""


#: the logged statistics the guard reads (averaged over ranks so every rank takes the same decision)
GUARD_KEYS = ("teacher_entropy", "teacher_batch_entropy", "feat_rank", "feat_std")


def mean_over_ranks(logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``logs`` with the :data:`GUARD_KEYS` entries averaged over ranks (one all-reduce; a no-op on one process)."""
    keys = [k for k in GUARD_KEYS if k in logs]
    if not keys or not dist.is_dist():
        return logs
    stacked = dist.all_reduce_mean(torch.stack([logs[k].float() for k in keys]))
    return {**logs, **dict(zip(keys, stacked, strict=True))}
