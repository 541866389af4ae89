"""Exact colour stage on the CPU in one kernel: uint8 -> float + random-order ColorJitter + grayscale (the
``("color_exact", "kernel")`` backend of ``DeviceAugment``).

Same semantics as :func:`pipeline.augment.color_ops.color_jitter_exact` followed by grayscale (torchvision float ops:
clamp after every op, contrast against the mean luma of the image *at that point of the sequence*, exact HSV hue),
computed row by row per sample so that every intermediate stays in L1 cache instead of going through memory once per
op:

* one task per sample, in parallel over numba threads; rows are loaded into three float32 row buffers (R, G, B), each
  op of the sample's order runs as a vectorisable loop over the row, the result is written once;
* contrast needs the mean luma of the image just before the contrast op: samples that jitter contrast get a first
  pass over their rows that runs the ops *before* contrast and accumulates the luma (float64), then the full pass.

The result does not depend on the thread count (one thread per sample, fixed order). It differs from torchvision's
per-image float ops by float32 rounding only (the tests bound it at 5e-6 per image, 2e-7 mean); speed against the
eager torch ops: ``docs/performance.md``.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is pinned in requirements.txt (FFCV needs it)
    numba = None

_W_R, _W_G, _W_B = np.float32(0.2989), np.float32(0.587), np.float32(0.114)  # color_ops.GRAY_WEIGHTS
_ZERO, _ONE, _HALF = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_TWO, _FOUR, _SIX = np.float32(2.0), np.float32(4.0), np.float32(6.0)
_TINY, _INV255 = np.float32(1e-30), np.float32(1.0 / 255.0)


if numba is not None:

    @njit(inline="always")
    def _clamp01(v):  # pragma: no cover - compiled
        return min(max(v, _ZERO), _ONE)

    @njit(inline="always")
    def _lerp(a, b, f):  # pragma: no cover - compiled; torch.lerp's float formula (exact at f = 0 and f = 1)
        return a + f * (b - a) if f < _HALF else b - (b - a) * (_ONE - f)

    @njit(inline="always")
    def _apply(op, f, mean, r, g, b):  # pragma: no cover - compiled
        """Op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with factor/shift ``f`` on row buffers."""
        w = r.shape[0]
        if op == 0:
            for j in range(w):
                r[j] = _clamp01(r[j] * f)
                g[j] = _clamp01(g[j] * f)
                b[j] = _clamp01(b[j] * f)
        elif op == 1:
            for j in range(w):
                r[j] = _clamp01(_lerp(mean, r[j], f))
                g[j] = _clamp01(_lerp(mean, g[j], f))
                b[j] = _clamp01(_lerp(mean, b[j], f))
        elif op == 2:
            for j in range(w):
                y = _W_R * r[j] + _W_G * g[j] + _W_B * b[j]
                r[j] = _clamp01(_lerp(y, r[j], f))
                g[j] = _clamp01(_lerp(y, g[j], f))
                b[j] = _clamp01(_lerp(y, b[j], f))
        else:
            shift6 = _SIX * f
            for j in range(w):
                rr, gg, bb = r[j], g[j], b[j]
                maxc = max(max(rr, gg), bb)
                chroma = maxc - min(min(rr, gg), bb)
                num = (gg - bb) if maxc == rr else ((_TWO * chroma + bb - rr) if maxc == gg else
                                                     (_FOUR * chroma + rr - gg))
                h6 = num / max(chroma, _TINY) + shift6
                hm = h6 - np.floor(h6 / _SIX) * _SIX
                d = abs(hm)
                r[j] = maxc - chroma * min(max(min(d, _SIX - d) - _ONE, _ZERO), _ONE)
                d = abs(hm - _TWO)
                g[j] = maxc - chroma * min(max(min(d, _SIX - d) - _ONE, _ZERO), _ONE)
                d = abs(hm - _FOUR)
                b[j] = maxc - chroma * min(max(min(d, _SIX - d) - _ONE, _ZERO), _ONE)

    @njit(inline="always")
    def _load(x, s, i, r, g, b):  # pragma: no cover - compiled
        for j in range(r.shape[0]):
            r[j] = np.float32(x[s, 0, i, j]) * _INV255
            g[j] = np.float32(x[s, 1, i, j]) * _INV255
            b[j] = np.float32(x[s, 2, i, j]) * _INV255

    @njit(parallel=True, nogil=True, cache=True)
    def _color_exact(x, out, ops_, factors, gray):  # pragma: no cover - compiled; tested via the wrapper
        """x (N, 3, H, W) uint8 and out (N, 3, H, W) float32, C-contiguous; ops_ (N, 4) int64 op ids in the order
        each sample applies them, 4 = skip; factors (N, 4) float32 by op id; gray (N,) bool."""
        n, h, w = x.shape[0], x.shape[2], x.shape[3]
        for s in prange(n):
            r, g, b = np.empty(w, np.float32), np.empty(w, np.float32), np.empty(w, np.float32)
            pc = 4  # position of the contrast op
            for p in range(4):
                if ops_[s, p] == 1:
                    pc = p
            mean = _ZERO
            if pc < 4:
                acc = 0.0
                for i in range(h):
                    _load(x, s, i, r, g, b)
                    for p in range(pc):
                        if ops_[s, p] < 4:
                            _apply(ops_[s, p], factors[s, ops_[s, p]], _ZERO, r, g, b)
                    for j in range(w):
                        acc += _W_R * r[j] + _W_G * g[j] + _W_B * b[j]
                mean = np.float32(acc / (h * w))
            for i in range(h):
                _load(x, s, i, r, g, b)
                for p in range(4):
                    if ops_[s, p] < 4:
                        _apply(ops_[s, p], factors[s, ops_[s, p]], mean, r, g, b)
                if gray[s]:
                    for j in range(w):
                        r[j] = _W_R * r[j] + _W_G * g[j] + _W_B * b[j]
                    g[:] = r
                    b[:] = r
                out[s, 0, i] = r
                out[s, 1, i] = g
                out[s, 2, i] = b


def kernel_available(x: torch.Tensor) -> bool:
    """Whether :func:`color_exact_cpu` can take ``x`` (uint8 on the CPU, numba importable)."""
    return numba is not None and x.device.type == "cpu" and x.dtype == torch.uint8


def color_exact_cpu(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor,
                    enabled: tuple[bool, bool, bool, bool], gray: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 -> float [0, 1] + exact random-order ColorJitter + optional grayscale, on CPU tensors.

    Args:
        x: (N, 3, H, W) uint8 (made contiguous if it is not).
        order: (N, 4) int64, per-sample permutation of op ids (brightness, contrast, saturation, hue).
        factors: (N, 4) float32, factors by op id (hue as a shift in turns).
        active: (N,) bool, the samples to jitter.
        enabled: which ops run at all (torchvision skips an op whose strength is 0).
        gray: optional (N,) bool, samples converted to grayscale after the jitter.

    Returns:
        (N, 3, H, W) float32 in [0, 1], contiguous.
    """
    if not kernel_available(x) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"color_exact_cpu: needs uint8 (N, 3, H, W) on the CPU and numba, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    x = x.contiguous()
    n = x.shape[0]
    on = torch.tensor(enabled, dtype=torch.bool)
    skip = ~(active.cpu()[:, None] & on[order.cpu()])
    ops_ = torch.where(skip, 4, order.cpu()).contiguous()
    gray = torch.zeros(n, dtype=torch.bool) if gray is None else gray.cpu()
    out = torch.empty(x.shape, dtype=torch.float32)
    threads = numba.get_num_threads()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))  # torch's budget
    try:
        _color_exact(x.numpy(), out.numpy(), ops_.numpy(), factors.cpu().to(torch.float32).contiguous().numpy(),
                     gray.contiguous().numpy())
    finally:
        numba.set_num_threads(threads)
    return out
