"""Colour jitter and grayscale with torchvision's float semantics: the reference every other backend is checked against.

Images are float32 ``(N, 3, H, W)`` RGB in ``[0, 1]``; per-sample parameters are 1-D tensors of length N (bool masks,
float32 factors); ops keep shape, device and dtype and never modify inputs. As torchvision's float-tensor functional
ops: every colour op clamps to ``[0, 1]``, grayscale uses ITU-R 601 luma (0.2989, 0.587, 0.114), contrast blends with
the image's mean luma at that point, hue is an HSV rotation.

The op unit of the random-order ColorJitter is :func:`sample_jitter` (per-sample op order and factors) plus an apply.
Its applies, one per backend (``pipeline.augment.backends.BACKENDS``):

* :func:`color_jitter_exact` (here) - the eager reference: samples regrouped per op position, each op run once per
  pixel;
* ``color_pointwise.color_jitter_pointwise`` - the same result as a per-pixel function, for ``torch.compile``;
* ``color_kernel.color_exact_cpu`` - the same result as one numba pass per sample (CPU batches);
* ``color_matrix.jitter_matrices`` - the fast approximation: one per-sample affine colour map.
"""

from __future__ import annotations

import torch

from pipeline.augment.pixel_ops import col

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, the constants of torchvision's rgb_to_grayscale
OPS = ("brightness", "contrast", "saturation", "hue")  # op ids 0..3 used by the per-sample order tensors
Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # R, G, B planes, each (N, H, W)


def sample_jitter(brightness: float, contrast: float, saturation: float, hue: float, order_u: torch.Tensor,
                  factor_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample op order and factors of ColorJitter(brightness, contrast, saturation, hue) from uniforms.

    Args:
        brightness, contrast, saturation, hue: torchvision strengths (factors in ``[max(0, 1 - s), 1 + s]``, hue
            shift in ``[-hue, hue]`` turns); a zero strength gives the identity factor.
        order_u: (N, 4) uniforms in [0, 1); their argsort is a uniform random permutation, like ``randperm(4)``.
        factor_u: (N, 4) uniforms in [0, 1).

    Returns:
        ``order`` (N, 4) int64, the op ids in the order each sample applies them, and ``factors`` (N, 4) float32 by
        op id (hue as the shift in turns).
    """
    order = torch.argsort(order_u, dim=1)
    lo = torch.tensor([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast), max(0.0, 1.0 - saturation), -hue])
    hi = torch.tensor([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue])
    return order, lo + (hi - lo) * factor_u


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``: (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * img + (1 - f) * other, 0, 1)`` with a per-sample factor (N,), as one lerp + one clamp pass."""
    return torch.lerp(other.expand_as(img), img, col(factor)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities: ``clamp(f * x)``; factor (N,) >= 0. (N, 3, H, W) -> same."""
    return (x * col(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-image mean luma (a grey image); factor (N,) >= 0. (N, 3, H, W) -> same."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    mean = (x.mean(dim=(2, 3)) @ w).reshape(-1, 1, 1, 1)  # mean of the luma = luma of the channel means
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-pixel luma; factor (N,) >= 0 (0 = grayscale). (N, 3, H, W) -> same."""
    return _blend(x, grayscale(x), factor)


def _hue_sextant(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, maxc: torch.Tensor, chroma: torch.Tensor):
    """HSV hue in sextants (``6 h``, in [-1, 5)) from planes (N, H, W); 0 for grey pixels.

    Ties between channels equal to the max resolve red, then green, then blue (PIL/torchvision order). The branch is
    selected with exact 0/1 lerps instead of ``torch.where`` (much slower on CPU); one division at the end.
    """
    not_r_num = torch.lerp(4.0 * chroma + r - g, 2.0 * chroma + b - r, (maxc == g).to(r.dtype))
    num = torch.lerp(not_r_num, g - b, (maxc == r).to(r.dtype))
    return num / chroma.clamp_min(1e-30)  # grey pixels: num == 0 exactly


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, all channels in ``[0, 1]``: (N, 3, H, W) -> (N, 3, H, W) as (h, s, v); grey pixels get h = s = 0."""
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    s = chroma / maxc.clamp_min(1e-30)  # black pixels: chroma == 0
    h = torch.remainder(_hue_sextant(r, g, b, maxc, chroma) / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hexcone_planes(h6: torch.Tensor, v: torch.Tensor, chroma: torch.Tensor) -> Planes:
    """Planes (N, H, W) of hue-in-sextants (any real), value and chroma (= v s) -> RGB planes in [0, 1].

    Closed form of the HSV hexcone: channel ``c = v - chroma * clamp(d_c - 1, 0, 1)`` where ``d_c`` is the circular
    distance (in sextants, period 6) from the hue to the channel's primary (R 0, G 2, B 4). Same piecewise-linear
    map as torchvision's six-case table, computed plane by plane without building the table.
    """
    hm = torch.remainder(h6, 6.0)
    planes = []
    for primary in (0.0, 2.0, 4.0):
        d = (hm - primary).abs()
        planes.append(v - chroma * (torch.minimum(d, 6.0 - d) - 1.0).clamp(0.0, 1.0))
    return planes[0], planes[1], planes[2]


def hue_planes(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, shift: torch.Tensor) -> Planes:
    """Exact HSV hue rotation on RGB planes (N, H, W); shift (N, 1, 1) in turns. Value and chroma are invariant."""
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    return _hexcone_planes(_hue_sextant(r, g, b, maxc, chroma) + 6.0 * shift, maxc, chroma)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB: (N, 3, H, W) as (h, s, v) in ``[0, 1]`` -> (N, 3, H, W) RGB in ``[0, 1]``."""
    h, s, v = hsv.unbind(dim=1)
    return torch.stack(_hexcone_planes(h * 6.0, v, v * s), dim=1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Exact HSV hue rotation (torchvision ``adjust_hue`` on float images); shift (N,) in [-0.5, 0.5] turns.

    Goes RGB -> (hue, value, chroma) -> RGB without materialising the HSV image: value and chroma are invariant
    under the rotation, so only the hue plane is shifted. (N, 3, H, W) -> same.
    """
    return torch.stack(hue_planes(*x.unbind(dim=1), shift.reshape(-1, 1, 1)), dim=1)


EXACT_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by op id


def color_jitter_exact(
    x: torch.Tensor,
    order: torch.Tensor,
    factors: torch.Tensor,
    active: torch.Tensor,
    enabled: tuple[bool, bool, bool, bool],
) -> torch.Tensor:
    """torchvision ColorJitter with a per-sample random op order, each op clamping to [0, 1].

    At each of the 4 positions the rows are regrouped (one gather) so that samples doing the same op are contiguous,
    and each op runs once on its slice: every pixel goes through each op once (the HSV hue op is by far the
    costliest). Inactive samples sit in a trailing block that no op touches. The grouping is computed on the host
    from host-side ``order``/``active``: no device sync.

    Args:
        x: (N, 3, H, W) float in [0, 1].
        order: (N, 4) int64 **CPU** tensor; row i is a permutation of op ids 0..3 (brightness, contrast,
            saturation, hue) in the order sample i applies them.
        factors: (N, 4) float32 on x's device, the op factors in op-id order (hue as a shift in turns).
        active: (N,) bool **CPU** tensor, the samples to jitter (ColorJitter's RandomApply draw).
        enabled: which ops run at all (torchvision skips an op whose strength is 0).

    Returns:
        (N, 3, H, W) float in [0, 1], a new tensor.
    """
    n = x.shape[0]
    rows = torch.arange(n)  # rows[r] = sample held in row r of the working tensor
    inv = torch.arange(n)  # inv[s] = row holding sample s
    for pos in range(4):
        op_at_pos = torch.where(active, order[:, pos], 4)  # 4 = no op
        rows = torch.argsort(op_at_pos, stable=True)
        x = x.index_select(0, inv[rows].to(x.device))
        inv = torch.empty_like(rows)
        inv[rows] = torch.arange(n)
        counts = torch.bincount(op_at_pos, minlength=5).tolist()  # host tensor: no device sync
        start = 0
        for op_id in range(4):
            stop = start + counts[op_id]
            if stop > start and enabled[op_id]:
                idx = rows[start:stop].to(factors.device)
                x[start:stop] = EXACT_OPS[op_id](x[start:stop], factors[idx, op_id])
            start = stop
    return x.index_select(0, inv.to(x.device))
