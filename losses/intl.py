"""INTL loss: IterNorm-whitened views, normalised MSE between them, plus the trace loss (Weng et al., ICLR 2024).

Reference: winci-ai/INTL @ 0aa69af ``methods/{intl,intl_m,base,whitening}.py``; notes ``docs/methods/intl.md``.

Letters: V views, B per-rank batch, N = gathered (global) batch, D embedding width.

Distributed: the projector outputs are all-gathered **with gradient** and whitened, and the loss is computed on the
global batch, identically on every rank (INTL's ``FullGatherLayer``). ``runtime.dist.gather_with_grad``'s backward
sums the gradient over ranks, so after DDP's gradient averaging the update equals the single-process update on the
concatenated batch. Whitening per GPU (``gather=False``) changes the method; it exists only for ablations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losses.common import fp32_island
from losses.kernels import fused_for, iternorm_whiten_fused
from losses.whitening import iternorm_whiten
from runtime import dist


def norm_mse(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``2 - 2 * mean_i cos(a_i, b_i)`` (the mean over the last-but-one dim). (..., N, D) x2 -> (...)."""
    return 2 - 2 * (F.normalize(a, dim=-1, eps=eps) * F.normalize(b, dim=-1, eps=eps)).sum(-1).mean(-1)


def trace_loss(y: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``sum (v - 1)^2`` over the unbiased variances v of the whitened output: a penalty on diag(cov(Y)) - 1.

    Args:
        y: (..., N, D) whitened embeddings.
        axis: 0 = variance of every sample over its D features (N terms); 1 = of every feature over the batch
            (D terms). A **sum**, not a mean, as upstream.
    Returns:
        (...) loss per leading index.
    """
    var = y.var(dim=-1 if axis == 0 else -2, unbiased=True)
    return (var - 1).pow(2).sum(-1)


def intl_trade_off(batch: int, dim: int, axis: int = 0) -> float:
    """lambda = 0.01 (log2 B - 3) for channel whitening (B = **global** batch), 0.01 (log2 D - 3) for axis 1."""
    return 0.01 * (math.log2(batch if axis == 0 else dim) - 3)


def intl_symmetric_loss(y: torch.Tensor, trade_off: float, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``intl``: view 0 anchors every pair, ``(1/(V-1)) sum_{i>=1} [nmse(Y_i, Y_0) + lambda (TL_i + TL_0)]``.

    Args:
        y: (V, N, D) whitened views, all carrying gradient, V >= 2.
    Returns:
        (loss, mean nmse over the V-1 pairs), scalars.
    """
    tl = trace_loss(y, axis)  # (V,)
    mse = norm_mse(y[1:], y[0:1])  # (V-1,)
    loss = (mse + trade_off * (tl[1:] + tl[0])).mean()
    return loss, mse.mean()


def intl_momentum_loss(y_online: torch.Tensor, y_target: torch.Tensor, trade_off: float,
                       axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``intl_m``: ``(1/(V-1)) sum_i [nmse(Y_i, sg(Ybar_0)) + lambda TL(Y_i)]``; the target view has no TL.

    Args:
        y_online: (V-1, N, D) whitened online views (views 1..V-1).
        y_target: (N, D) whitened momentum-network output of view 0 (detached here).
    Returns:
        (loss, mean nmse), scalars.
    """
    mse = norm_mse(y_online, y_target.detach().unsqueeze(0))
    loss = (mse + trade_off * trace_loss(y_online, axis)).mean()
    return loss, mse.mean()


class INTLLoss(nn.Module):
    """Stateless INTL criterion: gather -> IterNorm -> nmse + trace loss, all in fp32.

    Args:
        iters: Newton-Schulz steps (official 4).
        axis: 0 channel whitening (official default), 1 batch whitening.
        trade_off: lambda; None = ``intl_trade_off`` of the gathered batch size (axis 0) or width (axis 1).
        gather: whiten the all-gathered global batch (official); False = per-rank whitening (an ablation).
    """

    def __init__(self, iters: int = 4, axis: int = 0, trade_off: float | None = None, gather: bool = True):
        super().__init__()
        if axis not in (0, 1):
            raise ValueError(f"INTL axis must be 0 or 1, got {axis}")
        self.iters, self.axis, self.trade_off, self.gather = iters, axis, trade_off, gather

    def _gather_whiten(self, z: torch.Tensor, with_grad: bool) -> torch.Tensor:
        """(V, B, D) -> (V, N, D) whitened. One collective for all views; the gathered tensor is fp32 so the
        cross-rank gradient sum is fp32 too."""
        with fp32_island(z.device.type):
            z = z.float() if z.dtype != torch.float64 else z
            if self.gather:
                flat = z.transpose(0, 1).contiguous()  # (B, V, D): gather along the batch
                flat = dist.gather_with_grad(flat) if with_grad else dist.gather_no_grad(flat)
                z = flat.transpose(0, 1)
            if fused_for("intl", z.device) and z.dtype != torch.float64:
                return iternorm_whiten_fused(z, self.iters, self.axis)
            return iternorm_whiten(z, self.iters, self.axis)

    def lam(self, n: int, d: int) -> float:
        return self.trade_off if self.trade_off is not None else intl_trade_off(n, d, self.axis)

    def forward(self, z: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Symmetric ``intl`` when ``target`` is None, else the momentum variant.

        Args:
            z: (V, B, D) per-rank projector outputs with gradient (V >= 2 symmetric; V >= 1 with a target).
            target: (B, D) momentum-network projector output of view 0 (no gradient), or None.
        Returns:
            (scalar loss, logs of detached scalars: ``nmse``, ``trade_off``).
        """
        if z.dim() != 3 or (target is None and z.shape[0] < 2):
            raise ValueError(f"INTL expects (V, B, D) with V >= 2 views, got {tuple(z.shape)}")
        y = self._gather_whiten(z, with_grad=True)
        lam = self.lam(y.shape[1], y.shape[2])
        if target is None:
            loss, mse = intl_symmetric_loss(y, lam, self.axis)
        else:
            if target.shape != z.shape[1:]:
                raise ValueError(f"target must be {tuple(z.shape[1:])}, got {tuple(target.shape)}")
            y_t = self._gather_whiten(target.detach().unsqueeze(0), with_grad=False)[0]
            loss, mse = intl_momentum_loss(y, y_t, lam, self.axis)
        return loss, {"nmse": mse.detach(), "trade_off": torch.tensor(lam)}
