"""Batched image augmentation ops with per-sample parameters (stage [2] of the pipeline).

Every op works on a whole batch on the batch's device. Images are float32 ``(N, 3, H, W)`` RGB in ``[0, 1]`` unless
stated otherwise (uint8 only in :func:`hflip` and :func:`to_float01`); per-sample parameters are 1-D tensors of
length N on that device (bool masks, float32 factors); ops keep shape, device and dtype and never modify inputs.

Semantics follow torchvision's float-tensor functional ops: every colour op clamps to ``[0, 1]``, grayscale uses
ITU-R 601 luma (0.2989, 0.587, 0.114), contrast blends with the image's mean luma at that point, hue is an HSV
rotation. The random-order ColorJitter has three formulations:

* :func:`color_jitter_exact` - eager reference: samples regrouped per op position, each op run once per pixel;
* :func:`color_jitter_pointwise` - the same result as a per-pixel function of the R, G, B planes (plus one reduction
  for contrast), for ``torch.compile`` to fuse;
* :func:`jitter_matrices` + :func:`apply_color_matrix_u8` - the fast approximation: one per-sample affine colour map
  (hue as a rotation about the grey axis, clamping only at the end); :func:`jitter_matrices` gives the deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, the constants of torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize(threshold=128): pixels >= 128 are inverted
OPS = ("brightness", "contrast", "saturation", "hue")  # op ids 0..3 used by the per-sample order tensors
Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # R, G, B planes, each (N, H, W)


def _col(v: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) for broadcasting against images."""
    return v.reshape(-1, 1, 1, 1)


def to_float01(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` in 0..255 -> float32 in ``[0, 1]`` (same device)."""
    return x.to(torch.float32).mul_(1.0 / 255.0)


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples selected by ``mask`` left-right.

    Args:
        x: (N, C, H, W), any dtype (flip the uint8 input: 4x less memory traffic than float).
        mask: (N,) bool.

    Returns:
        (N, C, H, W), same dtype.
    """
    return torch.where(_col(mask), x.flip(-1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``: (N, 3, H, W) -> (N, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(img: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * img + (1 - f) * other, 0, 1)`` with a per-sample factor (N,), as one lerp + one clamp pass."""
    return torch.lerp(other.expand_as(img), img, _col(factor)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale intensities: ``clamp(f * x)``; factor (N,) >= 0. (N, 3, H, W) -> same."""
    return (x * _col(factor)).clamp_(0.0, 1.0)


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


def _hue_planes(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, shift: torch.Tensor) -> Planes:
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
    return torch.stack(_hue_planes(*x.unbind(dim=1), shift.reshape(-1, 1, 1)), dim=1)


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
        rgb = _select(col(hue_pos < stop), _hue_planes(*rgb, fh), rgb)
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


def solarize(x: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert (``1 - x``) pixels ``>= threshold`` in the samples selected by ``mask`` (N,) bool (None = all).

    (N, 3, H, W) float in [0, 1] -> same.
    """
    hit = x >= threshold if mask is None else _col(mask) & (x >= threshold)
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
