"""The fused colour path: random-order ColorJitter and grayscale composed into one per-sample affine colour map.

``jitter_matrices`` (+ ``grayscale_matrix``) build ``y = M x + b`` per sample from the same parameters as the exact
path (``color_ops.sample_jitter``); one pass over the image applies it: ``apply_color_matrix_u8`` (a batched matmul,
eager) or ``apply_color_matrix_pointwise`` (multiply-adds that ``torch.compile`` fuses into one loop). Exact up to the
clamping between ops and the hue rotation (deviation in :func:`jitter_matrices`).
"""

from __future__ import annotations

import math

import torch

from pipeline.augment.color_ops import GRAY_WEIGHTS


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per-sample channel means in [0, 1]: (N, 3, H, W) uint8 -> (N, 3) float32 (flip-invariant). Compiled, one
    pass over the uint8 input (eagerly a float copy of the input is made first, far slower on a CPU)."""
    return x.sum(dim=(2, 3), dtype=torch.float32) / (255.0 * x.shape[2] * x.shape[3])


def hue_rotation_matrix(shift: torch.Tensor) -> torch.Tensor:
    """Rotation of RGB space about the grey axis (1, 1, 1) by ``2 pi shift``: (N,) -> (N, 3, 3).

    The linear stand-in for an HSV hue shift: it maps the primaries exactly at multiples of 1/3 turn (red -> green for
    +1/3, like HSV) and keeps greys fixed, but moves colours along a circle instead of the HSV hexagon, so it
    desaturates/oversaturates in between and can leave the RGB cube (clamped afterwards).
    """
    theta = 2.0 * math.pi * shift
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = (1.0 - cos) / 3.0
    b = sin / math.sqrt(3.0)
    diag, plus, minus = cos + a, a + b, a - b
    row0 = torch.stack((diag, minus, plus), dim=-1)
    row1 = torch.stack((plus, diag, minus), dim=-1)
    row2 = torch.stack((minus, plus, diag), dim=-1)
    return torch.stack((row0, row1, row2), dim=-2)


def jitter_matrices(
    order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor, channel_means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose the per-sample jitter sequence into one affine colour map ``y = M x + b`` (no clamping in between).

    Brightness ``f I``, saturation ``s I + (1 - s) 1 w^T`` (w = luma weights) and the hue rotation are linear;
    contrast is ``c x + (1 - c) m`` with m the mean luma *of the image at that point of the sequence*, which for an
    affine map is ``w^T (M mu + b)`` with mu the input's per-channel mean - so the whole sequence is exact up to
    (a) the [0, 1] clamp torchvision applies after every op (here only once, at the end) and (b) the hue rotation
    replacing the HSV hexcone rotation. Cost: O(N) tiny matrices; the image is touched once by the caller.

    Args:
        order: (N, 4) int64, per-sample permutation of op ids (same device as the other tensors).
        factors: (N, 4) float32 (brightness, contrast, saturation factors; hue shift in turns).
        active: (N,) bool, samples that are jittered at all (others get the identity).
        channel_means: (N, 3) float32 per-channel mean of the input image in [0, 1].

    Returns:
        ``M`` (N, 3, 3) and ``b`` (N, 3) float32.
    """
    n, dev = order.shape[0], order.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    w = torch.tensor(GRAY_WEIGHTS, device=dev)
    ones = torch.ones(3, device=dev)
    fb, fc, fs, fh = factors.unbind(dim=1)
    sat = fs[:, None, None] * eye + (1.0 - fs)[:, None, None] * torch.outer(ones, w)
    rot = hue_rotation_matrix(fh)
    m_mat, b_vec = eye.clone(), torch.zeros(n, 3, device=dev)
    for pos in range(4):
        op = order[:, pos]
        mean_luma = ((m_mat @ channel_means[:, :, None]).squeeze(-1) + b_vec) @ w  # (N,)
        cands_m = (fb[:, None, None] * m_mat, fc[:, None, None] * m_mat, sat @ m_mat, rot @ m_mat)
        cands_b = (
            fb[:, None] * b_vec,
            fc[:, None] * b_vec + ((1.0 - fc) * mean_luma)[:, None],
            (sat @ b_vec[:, :, None]).squeeze(-1),
            (rot @ b_vec[:, :, None]).squeeze(-1),
        )
        m_new, b_new = m_mat, b_vec
        for op_id in range(4):
            sel = op == op_id
            m_new = torch.where(sel[:, None, None], cands_m[op_id], m_new)
            b_new = torch.where(sel[:, None], cands_b[op_id], b_new)
        m_mat, b_vec = m_new, b_new
    m_mat = torch.where(active[:, None, None], m_mat, eye)
    b_vec = torch.where(active[:, None], b_vec, torch.zeros_like(b_vec))
    return m_mat, b_vec


def grayscale_matrix(mask: torch.Tensor, m_mat: torch.Tensor, b_vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append grayscale (``1 w^T``) to the affine maps of the samples selected by ``mask`` (N,) bool."""
    w = torch.tensor(GRAY_WEIGHTS, device=m_mat.device)
    g = torch.outer(torch.ones(3, device=m_mat.device), w)
    return (
        torch.where(mask[:, None, None], g @ m_mat, m_mat),
        torch.where(mask[:, None], b_vec @ g.T, b_vec),
    )


def apply_color_matrix_u8(x: torch.Tensor, m_mat: torch.Tensor, b_vec: torch.Tensor) -> torch.Tensor:
    """``clamp(M (x / 255) + b, 0, 1)`` straight from uint8 in one batched matmul.

    Args:
        x: (N, 3, H, W) uint8.
        m_mat: (N, 3, 3) float32.
        b_vec: (N, 3) float32.

    Returns:
        (N, 3, H, W) float32 in [0, 1], contiguous.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).to(torch.float32)
    out = torch.baddbmm(b_vec[:, :, None], m_mat * (1.0 / 255.0), flat)
    return out.clamp_(0.0, 1.0).reshape(n, c, h, w)


def apply_color_matrix_pointwise(x: torch.Tensor, m_mat: torch.Tensor, b_vec: torch.Tensor) -> torch.Tensor:
    """Same as :func:`apply_color_matrix_u8`, written on R, G, B planes as multiply-adds.

    Slower eagerly (several passes), but ``torch.compile`` fuses it into one loop that reads uint8 and writes
    float32, whereas a bmm stays an external kernel with a separate uint8 -> float conversion pass.
    """
    rgb = [c.to(torch.float32) for c in x.unbind(dim=1)]
    m = (m_mat * (1.0 / 255.0))[:, :, :, None, None]  # (N, 3, 3, 1, 1)
    bias = b_vec[:, :, None, None]
    out = [(bias[:, i] + m[:, i, 0] * rgb[0] + m[:, i, 1] * rgb[1] + m[:, i, 2] * rgb[2]).clamp(0.0, 1.0)
           for i in range(3)]
    return torch.stack(out, dim=1)
