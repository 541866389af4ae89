"""Per-sample Gaussian blur with torch ops (any device): the op unit's sampling and the reference apply.

A sampled Gaussian of an odd number of taps, normalised, edge pixels replicated (as PIL's GaussianBlur does), with a
standard deviation drawn per sample in output pixels. ``blur_kernel.blur_selected_cpu_`` computes the same result
directly on CPU tensors (the ``("blur", "kernel")`` backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_sigma(sigma_range: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
    """Blur standard deviations uniform on ``sigma_range`` (output pixels): uniforms (N,) in [0, 1) -> (N,) float32."""
    s_lo, s_hi = sigma_range
    return s_lo + (s_hi - s_lo) * u


def blur_kernel_size(sigma_max: float, fixed: int = 0) -> int:
    """Odd 1-D kernel length: ``fixed`` if > 0, else ``2 ceil(3 sigma_max) + 1`` (truncation at 3 sigma)."""
    if fixed > 0:
        return fixed
    return 2 * math.ceil(3.0 * sigma_max) + 1


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised sampled Gaussians, one per sample: sigma (N,) -> (N, size)."""
    half = (size - 1) / 2.0
    t = torch.linspace(-half, half, size, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, edge pixels replicated (as PIL's GaussianBlur does).

    All samples go through one grouped (depthwise) conv per direction: the batch is folded into channels
    (1, N*3, H, W) and each channel gets its sample's 1-D kernel. The image is replicate-padded once on all sides
    (blurring replicated rows equals replicating blurred rows, so this is exact) and convolved channels-last
    (faster than NCHW for this depthwise shape with oneDNN on CPU; docs/performance.md).

    Args:
        x: (N, 3, H, W) float32.
        sigma: (N,) float32 standard deviations in output pixels.
        size: odd kernel length (see :func:`blur_kernel_size`).

    Returns:
        (N, 3, H, W) float32 (channels-last strided; ops downstream accept any layout).
    """
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma, size).repeat_interleave(c, dim=0)  # (N*C, size)
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="replicate")
    y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)
