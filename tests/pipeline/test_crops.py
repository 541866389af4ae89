"""RandomResizedCrop sampling: distributional parity with torchvision, no square-crop bug, numba twin, resize kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from pipeline.load.crops import crop_resize_uint8, sample_rrc, sample_rrc_batch, sample_rrc_nb

H, W = 300, 400  # non-square source: the ratio range matters relative to the image, not only to the crop
SCALE, RATIO = (0.05, 0.4), (3 / 4, 4 / 3)
N = 3000


def ks_stat(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


KS_CRIT = 1.95 * math.sqrt(2 / N)  # alpha = 0.001 two-sample critical value


def box_stats(boxes: np.ndarray, h: int = H, w: int = W) -> dict[str, np.ndarray]:
    top, left, ch, cw = boxes.T.astype(np.float64)
    return {
        "area": ch * cw / (h * w),
        "log_ratio": np.log(cw / ch),
        # relative position in the free range: uniform on [0, 1] when there is slack
        "top": np.where(h - ch > 0, top / np.maximum(h - ch, 1), 0.5),
        "left": np.where(w - cw > 0, left / np.maximum(w - cw, 1), 0.5),
    }


@pytest.fixture(scope="module")
def torchvision_boxes() -> np.ndarray:
    torch.manual_seed(123)
    img = torch.empty(3, H, W)
    return np.array([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(N)])


def _check_same_distribution(ours: np.ndarray, ref: np.ndarray) -> None:
    a, b = box_stats(ours), box_stats(ref)
    for key in a:
        stat = ks_stat(a[key], b[key])
        assert stat < KS_CRIT, f"{key}: KS statistic {stat:.3f} >= {KS_CRIT:.3f} vs torchvision"


def test_sample_rrc_matches_torchvision(torchvision_boxes):
    rng = np.random.default_rng(0)
    ours = np.array([sample_rrc(H, W, SCALE, RATIO, rng) for _ in range(N)])
    _check_same_distribution(ours, torchvision_boxes)


def test_sample_rrc_batch_matches_torchvision(torchvision_boxes):
    ours = sample_rrc_batch(np.full(N, H), np.full(N, W), SCALE, RATIO, np.random.default_rng(1))
    assert ours.shape == (N, 4) and ours.dtype == np.int64
    _check_same_distribution(ours, torchvision_boxes)


def test_crops_are_not_square():
    """The FFCV-SSL bug computes h like w, so every crop is square; ours must jitter the aspect ratio."""
    boxes = sample_rrc_batch(np.full(N, H), np.full(N, W), (0.25, 1.0), RATIO, np.random.default_rng(2))
    ratio = boxes[:, 3] / boxes[:, 2]
    assert np.mean(np.abs(np.log(ratio)) > 0.05) > 0.5
    assert ratio.min() < 0.8 and ratio.max() > 1.25  # both ends of [3/4, 4/3] are reached


@pytest.mark.parametrize("h,w", [(10, 2000), (2000, 10), (50, 60)])
def test_fallback_equals_torchvision(h, w):
    """When no attempt fits (scale near 1 with extreme image ratios) both return the same clamped centre crop."""
    scale = (0.999, 1.0) if h != 50 else (1.0, 1.0)
    ratio = (3 / 4, 4 / 3) if h != 50 else (2.0, 3.0)
    ref = RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
    assert sample_rrc(h, w, scale, ratio, np.random.default_rng(0)) == tuple(ref)
    assert tuple(sample_rrc_batch(np.array([h]), np.array([w]), scale, ratio, np.random.default_rng(0))[0]) == ref


def test_boxes_always_inside_image():
    rng = np.random.default_rng(3)
    hs, ws = rng.integers(8, 700, 2000), rng.integers(8, 700, 2000)
    boxes = sample_rrc_batch(hs, ws, (0.08, 1.0), (0.5, 2.0), rng)
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (ch > 0).all() and (cw > 0).all()
    assert (top + ch <= hs).all() and (left + cw <= ws).all()
    for h, w in zip(hs[:200], ws[:200]):
        t, lf, bh, bw = sample_rrc(int(h), int(w), (0.08, 1.0), (0.5, 2.0), rng)
        assert 0 <= t <= h - bh and 0 <= lf <= w - bw


@pytest.mark.skipif(sample_rrc_nb is None, reason="numba not installed")
def test_numba_twin_is_bitwise_identical():
    a = [sample_rrc(H, W, SCALE, RATIO, rng) for rng in [np.random.default_rng(7)] for _ in range(200)]
    rng = np.random.default_rng(7)
    b = [tuple(int(v) for v in sample_rrc_nb(H, W, SCALE, RATIO, rng)) for _ in range(200)]
    assert a == b
    assert sample_rrc_nb(10, 2000, (0.999, 1.0), RATIO, np.random.default_rng(0)) == (0, 993, 10, 13)


def test_batch_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        sample_rrc_batch(np.array([1, 2]), np.array([3]), SCALE, RATIO, np.random.default_rng(0))


@pytest.mark.parametrize("interp", ["auto", "bicubic", "bilinear", "area", "pil_bicubic"])
def test_crop_resize_contract(interp):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    for box, size in [((10, 5, 100, 80), 32), ((0, 0, 20, 20), 64), ((3, 4, 50, 30), (24, 40))]:
        out = crop_resize_uint8(img, box, size, interp)
        exp = (size, size) if isinstance(size, int) else size
        assert out.shape == (*exp, 3) and out.dtype == np.uint8
    const = np.full((50, 70, 3), (12, 200, 99), dtype=np.uint8)
    assert (crop_resize_uint8(const, (5, 5, 40, 60), 17, interp) == np.array([12, 200, 99])).all()


def test_crop_resize_auto_antialiases_downscale():
    """A 1-pixel checkerboard shrunk 8x must average to mid-grey (INTER_AREA), not alias to black/white."""
    board = ((np.indices((256, 256)).sum(axis=0) % 2) * 255).astype(np.uint8)
    img = np.repeat(board[:, :, None], 3, axis=2)
    out = crop_resize_uint8(img, (0, 0, 256, 256), 32, "auto").astype(np.float64)
    assert np.abs(out - 127.5).max() < 2
    assert crop_resize_uint8(img, (0, 0, 256, 256), 32, "pil_bicubic").astype(np.float64).std() < 2


def test_crop_resize_exact_crop_when_no_resize():
    img = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_resize_uint8(img, (5, 7, 20, 20), 20), img[5:25, 7:27])


def test_crop_resize_rejects_bad_input():
    img = np.zeros((40, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="outside image"):
        crop_resize_uint8(img, (30, 0, 20, 20), 16)
    with pytest.raises(ValueError, match="expected"):
        crop_resize_uint8(img.astype(np.float32), (0, 0, 20, 20), 16)
