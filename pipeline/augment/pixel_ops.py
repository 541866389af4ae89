"""Per-sample pixel ops shared by every backend of ``DeviceAugment``: flip, uint8 -> float, solarize, normalise, and
the host-mask subset helper.

Images are ``(N, C, H, W)``; per-sample parameters are (N,) tensors (bool masks). Ops keep shape and device and never
modify their inputs (except ``normalize(out=...)``, which writes ``out``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): pixels >= 128 are inverted


def col(v: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) for broadcasting against images."""
    return v.reshape(-1, 1, 1, 1)


def sample_bernoulli(u: torch.Tensor, p: float) -> torch.Tensor:
    """Whether each sample runs an op applied with probability ``p``: uniforms (N,) in [0, 1) -> (N,) bool."""
    return u < p


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` in 0..255 -> float32 in ``[0, 1]`` (same device)."""
    return x.to(torch.float32).mul_(1.0 / 255.0)


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples selected by ``mask`` left-right (the mask form: fixed shapes, for ``torch.compile``).

    Args:
        x: (N, C, H, W), any dtype (flip the uint8 input: 4x less memory traffic than float).
        mask: (N,) bool on x's device.

    Returns:
        (N, C, H, W), same dtype.
    """
    return torch.where(col(mask), x.flip(-1), x)


def hflip_subset(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mirror the samples selected by the host ``mask`` (N,) bool (None = none) on the subset only (eager form)."""
    return x if mask is None else on_subset(x, mask, lambda t, sel: t.flip(-1))


def solarize(x: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert (``1 - x``) pixels ``>= threshold`` in the samples selected by ``mask`` (N,) bool (None = all).

    (N, 3, H, W) float in [0, 1] -> same.
    """
    hit = x >= threshold if mask is None else col(mask) & (x >= threshold)
    return torch.lerp(x, 1.0 - x, hit.to(x.dtype))  # exact 0/1 select


def normalize(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None):
    """``x * scale + bias`` (= ``(x - mean) / std`` with ``scale = 1 / std``, ``bias = -mean / std``) in one pass.

    Args:
        x: (N, 3, H, W) float32 in [0, 1].
        scale: (1, 3, 1, 1) float32.
        bias: (1, 3, 1, 1) float32.
        out: optional preallocated output of any float dtype / memory format: cast and layout change happen in the
            same pass.

    Returns:
        (N, 3, H, W), float32 or ``out``.
    """
    if out is None:
        return torch.addcmul(bias, x, scale)
    return torch.addcmul(bias, x, scale, out=out)


def on_subset(x: torch.Tensor, mask: torch.Tensor, fn: Callable) -> torch.Tensor:
    """Apply ``fn(x[sel], sel)`` to the rows selected by the host bool ``mask`` (N,) and put them back.

    The selection is known on the host, so there is no device sync; ops then cost in proportion to the number of
    selected samples (e.g. blur with p=0.1 touches 10% of the batch). Returns ``x`` itself when no row is selected, a
    new tensor otherwise.
    """
    sel = torch.nonzero(mask).squeeze(1)
    if sel.numel() == 0:
        return x
    if sel.numel() == x.shape[0]:
        return fn(x, sel)
    sel_dev = sel.to(x.device, non_blocking=True)
    return x.index_copy(0, sel_dev, fn(x.index_select(0, sel_dev), sel))
