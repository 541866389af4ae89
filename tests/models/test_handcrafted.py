"""MV-MR hand-crafted representations: naive float64 references (HOG, local std), the official torchvision batch
transform (augment), kymatio wiring (scattering), shapes/dtypes/no-grad of the module."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from models.handcrafted import (
    CODE_SCALE,
    BatchColorJitter,
    HandcraftedRepresentations,
    batch_augment_transform,
    finite_adjust_hue,
    hog_features,
    local_std,
)
from runtime.seeding import Stream, derive_seed

SOBEL = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]


@pytest.fixture(autouse=True)
def _one_thread():
    """kymatio runs many tiny ops; OpenMP spinning makes them ~100x slower on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_hog(img: torch.Tensor, nbins: int, pool: int) -> torch.Tensor:
    """Pixel loops in float64 from spec mvmr.md §3.4 (zero-padded Sobel, floor bin = m, ceil bin += 1 - m, pool)."""
    b, c, h, w = img.shape
    x = img.double().tolist()
    out = torch.zeros(b, c * nbins, h // pool, w // pool, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            hist = [[[0.0] * w for _ in range(h)] for _ in range(nbins)]
            for i in range(h):
                for j in range(w):
                    g0 = g1 = 0.0
                    for u in range(3):
                        for v in range(3):
                            y, z = i + u - 1, j + v - 1
                            if 0 <= y < h and 0 <= z < w:
                                g0 += SOBEL[u][v] * x[n][ch][y][z]
                                g1 += SOBEL[v][u] * x[n][ch][y][z]
                    m = math.hypot(g0, g1)
                    phi = math.atan2(g0, g1) / math.pi * nbins
                    hist[math.floor(phi) % nbins][i][j] = m
                    hist[math.ceil(phi) % nbins][i][j] += 1 - m
            for k in range(nbins):
                for i in range(h // pool):
                    for j in range(w // pool):
                        cell = [hist[k][i * pool + u][j * pool + v] for u in range(pool) for v in range(pool)]
                        out[n, ch * nbins + k, i, j] = sum(cell) / pool**2
    return out


def naive_local_std(img: torch.Tensor, k: int = 3, eps: float = 1e-8) -> torch.Tensor:
    """Reflect-border k x k box mean and mean of squares, sqrt(m2 - m1^2 + eps), NaN -> 0."""
    b, c, h, w = img.shape
    x = img.double().tolist()

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * n - 2 - i if i >= n else i)

    out = torch.zeros(b, c, h, w, dtype=torch.float64)
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    vals = [x[n][ch][reflect(i + u - k // 2, h)][reflect(j + v - k // 2, w)]
                            for u in range(k) for v in range(k)]
                    m1 = sum(vals) / k**2
                    m2 = sum(v * v for v in vals) / k**2
                    var = m2 - m1 * m1 + eps
                    out[n, ch, i, j] = math.sqrt(var) if var >= 0 else 0.0
    return out


def _images(b=2, size=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def test_hog_matches_naive_reference():
    x = _images()
    got = hog_features(x, nbins=24, pool=8)
    assert got.shape == (2, 72, 2, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_hog(x, 24, 8), rtol=1e-5, atol=1e-5)


def test_hog_flat_image_puts_one_in_bin_zero():
    got = hog_features(torch.zeros(1, 1, 16, 16), nbins=24, pool=8)
    assert torch.equal(got[0, 0], torch.ones(2, 2)) and torch.equal(got[0, 1:], torch.zeros(23, 2, 2))


def test_local_std_matches_naive_reference():
    x = _images(seed=1)
    got = local_std(x, 3)
    torch.testing.assert_close(got.double(), naive_local_std(x, 3), rtol=1e-5, atol=2e-5)
    flat = local_std(torch.full((1, 1, 8, 8), 0.7), 3)
    assert flat.max() < 1e-3 and not flat.isnan().any()  # ~sqrt(eps) up to fp32 rounding, or 0 where that gave NaN


def test_augment_is_the_official_torchvision_transform_seeded_by_step():
    x = _images(b=3, size=32)
    reps = HandcraftedRepresentations(["full_img_augment"], seed=5)
    before = torch.random.get_rng_state()
    got = reps(x, step=7)["full_img_augment"]
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG stream is untouched
    official = T.Compose([  # torchvision exactly as the official code builds it
        T.RandomResizedCrop(32, antialias=False), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
        T.GaussianBlur(kernel_size=2 * int(0.05 * 32) + 1)])
    torch.manual_seed(derive_seed(Stream.HANDCRAFTED_AUGMENT, 5, 7))
    assert torch.equal(got, official(x))
    for step in range(8):  # every branch of the random order / RandomApply
        torch.manual_seed(derive_seed(Stream.HANDCRAFTED_AUGMENT, 5, step))
        assert torch.equal(reps(x, step)["full_img_augment"], official(x))
    assert torch.equal(reps(x, step=7)["full_img_augment"], got)  # a pure function of (seed, step)
    assert not torch.equal(reps(x, step=8)["full_img_augment"], got)


def test_hue_singularity_of_normalised_images_is_resolved_to_zero():
    x = torch.tensor([[-1.29, 0.0, -1.18], [0.3, -0.2, 0.1]]).T.reshape(1, 3, 1, 2)  # pixel 0: max channel exactly 0
    raw = TF.adjust_hue(x, 0.12)
    assert torch.isnan(raw[..., 0]).all()  # torchvision: saturation (max - min) / max = inf -> NaN
    fixed = finite_adjust_hue(x, 0.12)
    assert torch.equal(fixed[..., 0], torch.zeros(1, 3, 1)) and torch.equal(fixed[..., 1], raw[..., 1])
    jitter = BatchColorJitter(0.8, 0.8, 0.8, 0.2)
    for seed in range(6):
        torch.manual_seed(seed)
        assert torch.isfinite(jitter(x)).all()


def test_augment_draws_once_for_the_whole_batch():
    one = _images(b=1, size=32, seed=2)
    batch = one.expand(4, -1, -1, -1).contiguous()
    reps = HandcraftedRepresentations(["full_img_augment"])
    changed = 0
    for step in range(6):
        out = reps(batch, step)["full_img_augment"]
        assert out.shape == batch.shape
        assert all(torch.equal(out[0], out[i]) for i in range(1, 4))
        changed += not torch.allclose(out, batch)
    assert changed == 6


def test_augment_blur_kernel_follows_the_official_rule():
    blur = batch_augment_transform(224).transforms[-1]
    assert list(blur.kernel_size) == [23, 23] and tuple(blur.sigma) == (0.1, 2.0)
    assert list(batch_augment_transform(96).transforms[-1].kernel_size) == [9, 9]


def test_scattering_shape_and_constant_image():
    reps = HandcraftedRepresentations(["full_img_scatnet"])
    x = _images(b=2, size=32)
    y = reps(x, 0)["full_img_scatnet"]
    assert y.shape == (2, 3, 81, 8, 8)  # 1 + J L + L^2 J (J - 1) / 2 = 81 for J=2, L=8
    torch.testing.assert_close(reps(x[1:], 0)["full_img_scatnet"], y[1:], rtol=1e-5, atol=1e-6)  # per sample
    const = reps(torch.full((1, 3, 32, 32), 0.5), 0)["full_img_scatnet"]
    torch.testing.assert_close(const[:, :, 0], torch.full((1, 3, 8, 8), 0.5), rtol=1e-5, atol=1e-5)  # low-pass
    assert const[:, :, 1:].abs().max() < 1e-5  # wavelets have zero mean


def test_module_outputs_shapes_dtypes_and_no_grad():
    reps = HandcraftedRepresentations(list(CODE_SCALE))
    x = _images(b=2, size=32).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reps(x.bfloat16(), step=0)
    shapes = {"full_img": (2, 3, 32, 32), "full_img_scatnet": (2, 3, 81, 8, 8), "full_img_augment": (2, 3, 32, 32),
              "full_img_hog": (2, 72, 4, 4), "full_img_std": (2, 3, 32, 32)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in out.values())
    assert reps.state_dict() == {}  # kymatio filters are cached outside the module tree


def test_official_scales_and_unknown_name():
    assert CODE_SCALE == {"full_img": 32.0, "full_img_scatnet": 32.0, "full_img_augment": 32.0,
                          "full_img_hog": 1.0, "full_img_std": 1.0}
    with pytest.raises(ValueError, match="unknown representation"):
        HandcraftedRepresentations(["full_img_dct"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        HandcraftedRepresentations(["full_img"])(torch.zeros(2, 1, 8, 8), 0)
