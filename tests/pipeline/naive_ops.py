"""Naive float64 references shared by the augmentation tests (written from the equations, not from our kernels)."""

from __future__ import annotations

import numpy as np


def naive_blur(x: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """float64 separable Gaussian with edge replication, as an explicit sum over the size x size taps.

    (C, H, W) -> (C, H, W); taps exp(-t^2 / (2 sigma^2)) normalised to sum 1, t in [-size//2, size//2].
    """
    half = size // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    c, h, w = x.shape
    out = np.zeros((c, h, w))
    for a in range(size):
        rows = np.clip(np.arange(h) + a - half, 0, h - 1)
        for b in range(size):
            cols = np.clip(np.arange(w) + b - half, 0, w - 1)
            out += k[a] * k[b] * x[:, rows][:, :, cols]
    return out
