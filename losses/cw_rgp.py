"""CW-RGP loss: channel whitening with random group partition (Weng et al., NeurIPS 2022).

Reference: winci-ai/CW-RGP @ 5bbf6ed ``ImageNet/methods/{cwrgp,whitening,losses}.py``;
method notes ``docs/methods/cw_rgp.md`` ("Whitening", "Loss").

Letters: V views, B per-rank batch, n = ``w_size`` samples per sub-batch, S = B / n sub-batches, I = ``w_iter``
repetitions, D embedding width, G channel groups, d = D / G.

Per repetition: one random partition of the B samples into S sub-batches, shared by every view; for every
(sub-batch, view) an independent random channel permutation; each block is ZCA channel-whitened
(``losses.whitening.group_channel_whiten``); the loss averages ``nmse`` over all V(V-1)/2 view pairs and the I
repetitions. Gradients flow through everything (both branches, the eigendecomposition, the means).

Distributed: **per GPU**, as upstream (nothing is gathered; DDP averages the gradients). The random partitions are
a pure function of (seed, step, rank), so a resumed run redraws exactly the same ones and needs no RNG state.
"""

from __future__ import annotations

import torch
from torch import nn

from losses.common import fp32_island
from losses.intl import norm_mse
from losses.kernels import fused_for, group_channel_whiten_fused
from losses.whitening import compute_dtype, group_channel_whiten
from runtime.seeding import Stream, derive_seed


def partition_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, step, rank): resumable from ``step`` alone; ranks differ."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(Stream.CW_RGP_PARTITION, seed, step, rank))
    return gen


def draw_partitions(gen: torch.Generator, w_iter: int, batch: int, w_size: int, n_views: int, dim: int,
                    rand_group: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sample partitions and channel permutations for one step, drawn on the generator's device.

    Uniform permutations are ``argsort`` of fp64 uniforms (ties have probability ~dim^2 / 2^53).

    Returns:
        sample_perm: (I, B) int64; sub-batch s of repetition i is ``sample_perm[i, s*n:(s+1)*n]``.
        channel_perm: (I, S, V, D) int64; the identity when ``rand_group`` is False.
    """
    if batch % w_size:
        raise ValueError(f"w_size={w_size} must divide the per-rank batch {batch}")
    device = gen.device
    sample_perm = torch.rand(w_iter, batch, generator=gen, device=device, dtype=torch.float64).argsort(dim=-1)
    shape = (w_iter, batch // w_size, n_views, dim)
    if rand_group:
        channel_perm = torch.rand(shape, generator=gen, device=device, dtype=torch.float64).argsort(dim=-1)
    else:
        channel_perm = torch.arange(dim, device=device).expand(shape)
    return sample_perm, channel_perm


def cw_rgp_whiten(z: torch.Tensor, sample_perm: torch.Tensor, channel_perm: torch.Tensor, groups: int,
                  eps: float = 0.0, minus: int = 1, whiten=group_channel_whiten) -> torch.Tensor:
    """Whiten every (repetition, sub-batch, view) block, returned in the original sample order.

    Args:
        z: (V, B, D) head outputs of the V views.
        sample_perm: (I, B) sample partitions.
        channel_perm: (I, S, V, D) channel permutations.
        whiten: the block whitening function (the reference, or ``losses.kernels.group_channel_whiten_fused``).
    Returns:
        (I, V, B, D) whitened views (compute dtype).
    """
    n_views, batch, dim = z.shape
    n_iter, n_sub = channel_perm.shape[:2]
    w_size = batch // n_sub
    blocks = z[:, sample_perm.view(n_iter, n_sub, w_size)]  # (V, I, S, n, D)
    blocks = blocks.permute(1, 2, 0, 3, 4)  # (I, S, V, n, D)
    white = whiten(blocks, channel_perm, groups, eps, minus)
    white = white.permute(0, 2, 1, 3, 4).reshape(n_iter, n_views, batch, dim)  # rows in sample_perm order
    inverse = sample_perm.argsort(dim=-1)[:, None, :, None].expand(n_iter, n_views, batch, dim)
    return white.gather(2, inverse)


def pair_loss(w: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """Mean over repetitions and view pairs i < j of ``nmse`` (or plain ``mse`` with ``norm=False``).

    Args:
        w: (I, V, B, D) whitened views.
    Returns:
        scalar.
    """
    n_views = w.shape[1]
    terms = []
    for i in range(n_views - 1):
        for j in range(i + 1, n_views):
            if norm:
                terms.append(norm_mse(w[:, i], w[:, j]))  # (I,)
            else:
                terms.append((w[:, i] - w[:, j]).pow(2).mean(dim=(-2, -1)))
    return torch.stack(terms).mean()


def channel_covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """Optional ImageNet regulariser on **un-whitened** outputs: ``sum_{i != j} C_ij^2 / B`` with
    ``C = Zc Zc^T / (D - 1)``, Zc = Z centred per sample (the B x B sample Gram). (..., B, D) -> (...)."""
    zc = z - z.mean(dim=-1, keepdim=True)
    c = zc @ zc.mT / (z.shape[-1] - 1)
    off = c.pow(2).sum(dim=(-2, -1)) - c.diagonal(dim1=-2, dim2=-1).pow(2).sum(-1)
    return off / z.shape[-2]


class CWRGPLoss(nn.Module):
    """Stateless CW-RGP criterion (randomness is passed in, drawn by :func:`draw_partitions`).

    Args:
        groups: channel groups G (ImageNet 2, CIFAR 4).
        w_size: samples per whitening sub-batch (ImageNet 128, CIFAR 64); must be <= D / G.
        w_iter: repetitions of the random partition per step (official 1).
        eps: whitening ridge (official 0). minus: Gram denominator d - minus (official 1).
        norm: normalised MSE (official); False = plain MSE (``--no_norm``).
        rand_group: random channel permutation per block (official); False = fixed contiguous groups.
    """

    def __init__(self, groups: int = 2, w_size: int = 128, w_iter: int = 1, eps: float = 0.0, minus: int = 1,
                 norm: bool = True, rand_group: bool = True):
        super().__init__()
        self.groups, self.w_size, self.w_iter = groups, w_size, w_iter
        self.eps, self.minus, self.norm, self.rand_group = eps, minus, norm, rand_group

    def draw(self, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Partitions for ``z`` (V, B, D)."""
        return draw_partitions(gen, self.w_iter, z.shape[1], self.w_size, z.shape[0], z.shape[2], self.rand_group)

    def forward(self, z: torch.Tensor, sample_perm: torch.Tensor, channel_perm: torch.Tensor,
                cov_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Args: z (V, B, D) per-rank head outputs; permutations from :meth:`draw`; ``cov_weight`` the current
        weight of :func:`channel_covariance_loss` (0 disables it). Returns (scalar loss, detached logs)."""
        if z.dim() != 3 or z.shape[0] < 2:
            raise ValueError(f"CW-RGP expects (V, B, D) with V >= 2 views, got {tuple(z.shape)}")
        with fp32_island(z.device.type):
            z = z.to(compute_dtype(z))
            fused = fused_for("cw_rgp", z.device) and z.dtype != torch.float64  # CPU: reference unless forced
            whiten = group_channel_whiten_fused if fused else group_channel_whiten
            white = cw_rgp_whiten(z, sample_perm, channel_perm, self.groups, self.eps, self.minus, whiten)
            mse = pair_loss(white, self.norm)
            logs = {"mse": mse.detach()}
            loss = mse
            if cov_weight:
                cov = channel_covariance_loss(z).sum()
                loss = loss + cov_weight * cov
                logs["cov"] = cov.detach()
        return loss, logs

