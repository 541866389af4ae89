"""MV-MR loss: invariance + variance + distance-correlation terms between two views and several representations.

Kinakh, Drozdova, Voloshynovskiy, "MV-MR: multi-views and multi-representations for self-supervised learning and
knowledge distillation" (arXiv 2303.12130, Entropy 2024). Reference code: vkinakh/mv-mr @ 7136f70
(``src/model/self_supervised_module.py::step``, ``src/loss/distance_correlation.py``);
method notes ``docs/methods/mvmr.md`` ("Loss").

Letters: B per-rank batch, D embedding width, F width of a flattened target representation.

    L = mse(z_o, z_a) + std(z_a) + std(z_o) + (1 - dCor(z_o, z_a)) + sum_r T_r
    T_r = dCor(psi_r, z_a)        hand-crafted representation, official code (it *adds* dCor)
    T_r = 1 - dCor(psi_r, z_a)    paper wording ("maximise"), and always for the distillation teacher

Everything is per rank (no gather), as in the official code. The official code divides z and some representations
by 32 "for fp16"; distance correlation is invariant to that scaling except through the 1e-4 clamp of the squared
distances, so here every tensor keeps its natural scale and the clamp is expressed in its units instead:
``dCor(x / s, y / t, clamp=c) == dCor(x, y, x_clamp=c * s**2, y_clamp=c * t**2)`` (power-of-two ``s`` is exact in
floating point). All of it runs in fp32 whatever the ambient autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import at_least_fp32, fp32_island
from losses.kernels import distance_correlations_fused, fused_for


# ---------------------------------------------------------------------------------------------- distance correlation
def pairwise_distances(x: torch.Tensor, clamp: float = 1e-4) -> torch.Tensor:
    """Euclidean distance matrix through the Gram expansion, squared distances clamped below at ``clamp``.

    Args:
        x: (N, F) samples.
        clamp: lower bound of the *squared* distances; keeps the sqrt differentiable on the diagonal (which becomes
            ``sqrt(clamp)``, not 0), as in the official code.
    Returns:
        (N, N) matrix ``a_ij = sqrt(max(|x_i|^2 - 2 x_i.x_j + |x_j|^2, clamp))``.
    """
    sq = (x * x).sum(dim=1)
    d2 = sq[:, None] - 2.0 * (x @ x.T) + sq[None, :]
    return d2.clamp(min=clamp).sqrt()


def double_centre(a: torch.Tensor) -> torch.Tensor:
    """``A_ij = a_ij - mean_k a_kj - mean_k a_ik + mean_kl a_kl``. (N, N) -> (N, N)."""
    return a - a.mean(dim=0, keepdim=True) - a.mean(dim=1, keepdim=True) + a.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor, x_clamp: float = 1e-4, y_clamp: float = 1e-4
                         ) -> torch.Tensor:
    """Biased (V-statistic) distance correlation, not squared: ``sqrt(<A,B> / sqrt(<A,A> <B,B>))``.

    Pure and self-contained (``losses/kernels/dcor_compiled.py`` fuses exactly this function). Computed in fp32
    unless the inputs are float64; the caller disables autocast.

    Args:
        x: (N, P) samples of the first variable (rows paired with ``y``).
        y: (N, Q) samples of the second variable.
        x_clamp: clamp of the squared distances of ``x`` (see :func:`pairwise_distances`).
        y_clamp: same for ``y``.
    Returns:
        scalar in [0, 1] (NaN if the clamp made the centred product negative, as the official code).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"distance_correlation needs (N, P) and (N, Q) inputs, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = at_least_fp32(x), at_least_fp32(y)
    a = double_centre(pairwise_distances(x, x_clamp))
    b = double_centre(pairwise_distances(y, y_clamp))
    dcov2_xy = (a * b).mean()
    dvar2_x = (a * a).mean()
    dvar2_y = (b * b).mean()
    return (dcov2_xy / (dvar2_x * dvar2_y).sqrt()).sqrt()


# ---------------------------------------------------------------------------------------------- VICReg-like terms
def invariance_term(z_o: torch.Tensor, z_a: torch.Tensor) -> torch.Tensor:
    """``mean_{b,d} (z_o - z_a)^2`` on the unscaled embeddings. (B, D), (B, D) -> scalar."""
    return F.mse_loss(z_o, z_a)


def variance_term(z: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``mean_d relu(margin - std_b(z)_d)`` with the unbiased std and no epsilon (official). (B, D) -> scalar."""
    return torch.relu(margin - z.std(dim=0)).mean()


# ---------------------------------------------------------------------------------------------- module
@dataclass
class DCorTarget:
    """One representation ``psi`` that the augmented-view embedding ``z_a`` is compared with by distance correlation.

    Attributes:
        features: (B, ...) tensor, flattened to (B, F); no gradient flows into it.
        clamp: clamp of its squared pairwise distances, in its own units (official ``1e-4 * scale**2``).
        maximise: True -> term ``1 - dCor`` (dependence is increased); False -> ``+dCor`` (decreased).
    """

    features: torch.Tensor
    clamp: float
    maximise: bool


class MVMRLoss(nn.Module):
    """MV-MR objective on one rank's batch. Stateless; all weights are 1 as in the official code.

    Args:
        std_margin: target standard deviation of every embedding dimension (official 1).
        z_clamp: clamp of the squared pairwise distances of the embeddings, in the embeddings' units; the official
            ``dCor(z / 32)`` with clamp 1e-4 is ``z_clamp = 1e-4 * 32**2``.
    """

    def __init__(self, std_margin: float = 1.0, z_clamp: float = 1e-4 * 32**2):
        super().__init__()
        self.std_margin = std_margin
        self.z_clamp = z_clamp

    def forward(self, z_o: torch.Tensor, z_a: torch.Tensor, targets: dict[str, DCorTarget]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args: z_o, z_a — (B, D) embeddings of the original and the augmented view (with gradient); targets —
        named representations of the original view. Returns (scalar loss, detached per-term logs)."""
        if z_o.shape != z_a.shape or z_o.ndim != 2:
            raise ValueError(f"z_o and z_a must both be (B, D), got {tuple(z_o.shape)} and {tuple(z_a.shape)}")
        if z_o.shape[0] < 2:
            raise ValueError(f"MV-MR needs at least 2 samples per rank (std, dCor), got batch {z_o.shape[0]}")
        with fp32_island(z_o.device.type):
            z_o, z_a = at_least_fp32(z_o), at_least_fp32(z_a)
            for name, t in targets.items():
                if t.features.shape[0] != z_a.shape[0]:
                    raise ValueError(f"target {name!r} has batch {t.features.shape[0]}, embeddings have {z_a.shape[0]}")
            xs = [z_o] + [t.features.detach().flatten(1) for t in targets.values()]
            clamps = [self.z_clamp] + [t.clamp for t in targets.values()]
            if fused_for("mvmr", z_a.device) and all(x.dtype != torch.float64 for x in xs + [z_a]):
                dcs = distance_correlations_fused(z_a, xs, self.z_clamp, clamps)  # z_a's matrix built once
            else:
                dcs = [distance_correlation(x, z_a, c, self.z_clamp) for x, c in zip(xs, clamps)]
            terms = {
                "mse": invariance_term(z_o, z_a),
                "std": variance_term(z_a, self.std_margin) + variance_term(z_o, self.std_margin),
                "dc_zz": 1.0 - dcs[0],
            }
            for (name, t), dc in zip(targets.items(), dcs[1:]):
                terms[f"dc_{name}"] = 1.0 - dc if t.maximise else dc
            loss = torch.stack(list(terms.values())).sum()
        return loss, {k: v.detach() for k, v in terms.items()}
