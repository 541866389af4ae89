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
"""

from __future__ import annotations

import torch
from torch import nn


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


def pooled_feature_module(backbone: nn.Module) -> nn.Module:
    """The module whose output is the pooled (N, D) feature: timm's ``global_pool`` module, else the backbone."""
    pool = getattr(backbone, "global_pool", None)
    return pool if isinstance(pool, nn.Module) else backbone


class CollapseMonitor:
    """Watches ``backbone``'s pooled outputs (N, D) and turns the first ``rows`` rows of the first call into statistics.

    Use: ``arm()`` before a logging step's forward, ``stats()`` after it (empty when the hook saw nothing, e.g. a
    backbone that returns feature maps). Rows are view-major in every method, so the first ``rows`` rows are the
    first view's batch.
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

    def stats(self) -> dict[str, torch.Tensor]:
        feats, self._armed, self._feats = self._feats, False, None
        if feats is None or feats.shape[0] < 2:
            return {}
        return {"feat_rank": effective_rank(feats), "feat_std": normalized_std(feats)}

    def close(self) -> None:
        self._handle.remove()
