"""The exact random-order ColorJitter (+ grayscale) as a per-pixel function of the R, G, B planes (torch.compile).

Same semantics as :func:`pipeline.augment.color_ops.color_jitter_exact`; fixed shapes and no regrouping of samples,
so inductor fuses each of the two passes into one loop. Eagerly several times slower than the regrouping reference:
the ``("color_exact", "compiled")`` backend only.
"""

from __future__ import annotations

import torch

from pipeline.augment.color_ops import GRAY_WEIGHTS, Planes, hue_planes


def _luma(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _select(mask: torch.Tensor, a: Planes, b: Planes) -> Planes:
    return torch.where(mask, a[0], b[0]), torch.where(mask, a[1], b[1]), torch.where(mask, a[2], b[2])


def _cheap_planes(rgb: Planes, op: torch.Tensor, f: Planes, mean_luma: torch.Tensor | None) -> Planes:
    """Per-sample brightness (op 0) / contrast (1) / saturation (2) on planes; other ids (or contrast without a
    mean) are no-ops. op, factors and mean are (N, 1, 1). Every candidate is computed for every pixel, which only
    pays off when ``torch.compile`` fuses it into one loop."""
    fb, fc, fs = f
    out = _select(op == 0, tuple((c * fb).clamp(0.0, 1.0) for c in rgb), rgb)
    if mean_luma is not None:
        out = _select(op == 1, tuple(torch.lerp(mean_luma, c, fc).clamp(0.0, 1.0) for c in rgb), out)
    gray = _luma(*rgb)
    return _select(op == 2, tuple(torch.lerp(gray, c, fs).clamp(0.0, 1.0) for c in rgb), out)


def _pointwise_chain(rgb: Planes, ops_: torch.Tensor, factors: torch.Tensor, mean_luma: torch.Tensor | None,
                     hue_on: bool) -> Planes:
    """The jitter sequence on planes; ``mean_luma=None`` stops each sample just before its contrast op."""
    n = ops_.shape[0]
    col = lambda v: v.reshape(-1, 1, 1)  # noqa: E731
    fb, fc, fs, fh = (col(f) for f in factors.unbind(dim=1))
    mean = None if mean_luma is None else col(mean_luma)
    pos = torch.arange(4, device=ops_.device).expand(n, 4)
    never = torch.full_like(ops_, 4)
    hue_pos = torch.where(ops_ == 3, pos, never).amin(dim=1)  # 4 = no hue (inactive sample)
    stop = never[:, 0] if mean_luma is not None else torch.where(ops_ == 1, pos, never).amin(dim=1)
    for p in range(4):  # ops before the hue op
        rgb = _cheap_planes(rgb, col(torch.where((p < hue_pos) & (p < stop), ops_[:, p], 4)), (fb, fc, fs), mean)
    if hue_on:  # the costly hue op runs once per pixel, at its position in the sequence
        rgb = _select(col(hue_pos < stop), hue_planes(*rgb, fh), rgb)
    for p in range(4):  # ops after the hue op
        rgb = _cheap_planes(rgb, col(torch.where((p > hue_pos) & (p < stop), ops_[:, p], 4)), (fb, fc, fs), mean)
    return rgb


def color_jitter_pointwise(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, active: torch.Tensor,
                           gray: torch.Tensor | None = None, hue_on: bool = True) -> torch.Tensor:
    """:func:`color_jitter_exact` + optional grayscale, formulated for ``torch.compile``: fixed shapes, no regrouping.

    Every op but contrast is pointwise, so the random-order sequence is a per-pixel function of the input and the
    sample's parameters - except contrast's mean luma, which depends on the image just before the contrast op. Two
    passes: (1) run each sample's sequence up to its contrast op and reduce the mean luma, (2) run the full sequence.
    Written on separate R, G, B planes so that every intermediate has the same indexing and inductor fuses each
    pass into one loop (an NCHW formulation made it materialise intermediates). Eagerly this is several
    times slower than the regrouping version - use it compiled only.

    Args:
        x: (N, 3, H, W) uint8 (or float in [0, 1]).
        order: (N, 4) int64 on x's device, per-sample op permutation.
        factors: (N, 4) float32 on x's device.
        active: (N,) bool on x's device, samples to jitter.
        gray: optional (N,) bool, samples converted to grayscale after the jitter.
        hue_on: False skips hue (strength 0), as torchvision does.

    Returns:
        (N, 3, H, W) float32 in [0, 1].
    """
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    rgb: Planes = tuple(c.to(torch.float32) * scale for c in x.unbind(dim=1))  # type: ignore[assignment]
    ops_ = torch.where(active[:, None], order, 4)
    mean_luma = _luma(*_pointwise_chain(rgb, ops_, factors, None, hue_on)).mean(dim=(1, 2))
    rgb = _pointwise_chain(rgb, ops_, factors, mean_luma, hue_on)
    if gray is not None:
        luma = _luma(*rgb)
        rgb = _select(gray.reshape(-1, 1, 1), (luma, luma, luma), rgb)
    return torch.stack(rgb, dim=1)
