"""Per-sample Gaussian blur on CPU tensors in one numba kernel: the ``("blur", "kernel")`` backend of ``DeviceAugment``.

:func:`pipeline.augment.blur_ops.gaussian_blur` (a grouped convolution, any device) is the reference. On a CPU that
convolution, one group per channel of every sample, is the costliest augmentation op, so CPU tensors go through
:func:`blur_selected_cpu_`, which computes **the same sampled, truncated and normalised Gaussian** directly:

* one task per selected (sample, channel) plane - or per sample for channels-last tensors (the FFCV layout) - over
  numba threads; a vertical pass into a plane-sized scratch, then a horizontal pass over an edge-replicated copy of
  each row, written back **in place** (no layout change, no copy or gather of samples);
* inner loops run along contiguous rows; each sample runs only its significant taps (tails below ``1e-9`` of the
  centre tap change no float32 result), so sigma = 0.3 costs 5 taps per pass instead of 13;
* the result does not depend on the number of threads (one thread per plane, fixed order).

Speed against the convolution: ``docs/performance.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.augment.blur_ops import gaussian_kernels

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is pinned in requirements.txt (FFCV needs it)
    numba = None

NEGLIGIBLE_TAP = 1e-9  # taps below this fraction of the centre tap are skipped by the direct kernel


def significant_radius(kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample radius of the taps that matter: kernels (N, K) symmetric, K odd -> (N,) int64 in [0, K // 2]."""
    half = kernels.shape[1] // 2
    keep = kernels >= NEGLIGIBLE_TAP * kernels[:, half : half + 1]
    return half - keep.to(torch.int64).argmax(dim=1)  # first kept tap from the left


if numba is not None:

    @njit(parallel=True, nogil=True, cache=True)
    def _blur_planes_(x, samples, weights, radius, step):  # pragma: no cover - compiled; tested via the wrapper
        """In-place separable blur of the planes ``x[s, p]`` (H, L) for s in ``samples``.

        x: (N, P, H, L) float32 C-contiguous, a pixel's neighbours along a row ``step`` elements apart (NCHW:
        P = C planes with L = W, step 1; NHWC: one plane per sample with L = W * C, step C); samples: (S,) int64;
        weights: (N, K) float32; radius: (N,) int64.
        """
        n_planes, h, length = x.shape[1], x.shape[2], x.shape[3]
        half = weights.shape[1] // 2
        for q in prange(samples.shape[0] * n_planes):
            s = samples[q // n_planes]
            plane = x[s, q % n_planes]
            r = radius[s]
            k = weights[s, half - r : half + r + 1]
            tmp = np.empty((h, length), np.float32)
            pad = r * step
            row = np.empty(length + 2 * pad, np.float32)
            for i in range(h):  # vertical pass: rows are clamped at the borders (edge replication)
                acc = tmp[i]
                src = plane[max(i - r, 0)]
                for j in range(length):
                    acc[j] = k[0] * src[j]
                for t in range(1, 2 * r + 1):
                    src = plane[min(max(i + t - r, 0), h - 1)]
                    wt = k[t]
                    for j in range(length):
                        acc[j] += wt * src[j]
            for i in range(h):  # horizontal pass over an edge-replicated copy of the row, back into the plane
                src = tmp[i]
                mid = row[pad : pad + length]  # offsets go into slices: a variable offset inside the index
                for j in range(length):  # defeats vectorisation (numba's negative-index wraparound check)
                    mid[j] = src[j]
                for e in range(pad):  # scalar loops: numba's slice assignments cost more than these few pixels
                    row[e] = src[e % step]
                    row[pad + length + e] = src[length - step + e % step]
                dst = plane[i]
                for j in range(length):
                    dst[j] = k[0] * row[j]
                for t in range(1, 2 * r + 1):
                    wt = k[t]
                    seg = row[t * step : t * step + length]
                    for j in range(length):
                        dst[j] += wt * seg[j]


def direct_blur_available(x: torch.Tensor) -> bool:
    """Whether :func:`blur_selected_cpu_` can take ``x`` (a CPU float32 tensor, numba importable)."""
    return numba is not None and x.device.type == "cpu" and x.dtype == torch.float32


def blur_selected_cpu_(x: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Blur the samples selected by ``mask`` **in place** with their own sigma (same result as
    :func:`pipeline.augment.blur_ops.gaussian_blur`: sampled Gaussian of ``size`` taps, normalised, edges replicated).

    Args:
        x: (N, 3, H, W) float32 CPU tensor, contiguous or channels-last (any other layout is first copied to
            channels-last, and the copy is blurred).
        mask: (N,) bool CPU tensor, the samples to blur.
        sigma: (N,) float32 CPU tensor (entries of unselected samples are ignored).
        size: odd kernel length (:func:`pipeline.augment.blur_ops.blur_kernel_size`).

    Returns:
        ``x`` itself when it was contiguous or channels-last, else its blurred channels-last copy.
    """
    if not direct_blur_available(x):
        raise ValueError(f"blur_selected_cpu_: needs a float32 CPU tensor and numba, got {x.dtype} on {x.device}")
    if x.ndim != 4 or mask.shape != (x.shape[0],) or sigma.shape != (x.shape[0],) or size % 2 == 0:
        raise ValueError(f"blur_selected_cpu_: x (N, C, H, W), mask/sigma (N,), odd size; got {tuple(x.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(sigma.shape)}, {size}")
    n, c, h, w = x.shape
    if x.is_contiguous():
        planes, step = x.numpy(), 1
    else:
        x = x.contiguous(memory_format=torch.channels_last)  # no-op for NHWC tensors (the FFCV loader's layout)
        planes, step = x.permute(0, 2, 3, 1).numpy().reshape(n, 1, h, w * c), c  # a view: one plane per sample
    samples = torch.nonzero(mask.cpu()).squeeze(1)
    if samples.numel() == 0:
        return x
    kernels = gaussian_kernels(sigma.cpu().to(torch.float32), size)
    threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # torch's budget
    try:
        _blur_planes_(planes, samples.numpy(), kernels.numpy(), significant_radius(kernels).numpy(), step)
    finally:
        numba.set_num_threads(threads)
    return x

