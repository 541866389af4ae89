"""Device augmentation: per-op parity with torchvision, random rates and ranges, order semantics, fused-path bound,
determinism/resume, stacking, layout contracts, compiled == eager."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

from pipeline.augment import backends, blur_ops, color_kernel, color_ops, pixel_ops
from pipeline.augment.gpu_augment import DeviceAugment
from pipeline.augment.params import sample_params
from pipeline.batch import Batch
from pipeline.config import AugmentConfig, DataConfig, ViewConfig, dino_views
from tests.pipeline.naive_ops import naive_blur

ID_MEAN, ID_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # normalisation off: outputs are the [0, 1] images
TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def bare_view(size: int = 8, **kw) -> ViewConfig:
    """A view with every random op off unless given."""
    base = dict(size=size, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return ViewConfig(**{**base, **kw})


def make_batch(views: list[ViewConfig], b: int, seed: int = 0, smooth: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in views:
        if smooth:  # natural-ish: low-frequency colour fields
            small = torch.rand(b, 3, max(2, v.size // 8), max(2, v.size // 8), generator=g)
            x = torch.nn.functional.interpolate(small, size=(v.size, v.size), mode="bilinear")
        else:
            x = torch.rand(b, 3, v.size, v.size, generator=g)
        out.append((x * 255).round().to(torch.uint8))
    n_global = sum(v.role == "global" for v in views)
    return Batch(out, torch.arange(b) % 3, torch.arange(b) + 100, n_global)


def constant_batch(rgb: tuple[int, int, int], n: int, size: int = 4) -> Batch:
    x = torch.tensor(rgb, dtype=torch.uint8).reshape(1, 3, 1, 1).expand(n, 3, size, size).contiguous()
    return Batch([x], torch.zeros(n, dtype=torch.long), torch.arange(n), 1)


def run(view: ViewConfig, batch: Batch, seed: int = 0, jitter_impl: str = "exact", **kw) -> torch.Tensor:
    impl = AugmentConfig(jitter_impl=jitter_impl)
    return DeviceAugment([view], ID_MEAN, ID_STD, seed=seed, impl=impl, **kw)(batch).views[0]


def assert_rate(hits: torch.Tensor, p: float) -> None:
    n = hits.numel()
    rate = hits.float().mean().item()
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, f"rate {rate:.3f} vs p={p}"


# ----------------------------------------------------------------------------------------------- single ops


def test_exact_ops_match_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 9, 11, generator=g)
    x[0] = 0.5  # grey image
    x[1, :, :4] = x[1, :1, :4]  # grey pixels
    x[2, 0] = x[2, 1]  # ties between channels
    x[3] = (x[3] * 255).round() / 255
    fac = torch.rand(12, generator=g) * 1.6
    shift = torch.rand(12, generator=g) - 0.5
    cases = [(color_ops.adjust_brightness, TF.adjust_brightness, fac),
             (color_ops.adjust_contrast, TF.adjust_contrast, fac),
             (color_ops.adjust_saturation, TF.adjust_saturation, fac), (color_ops.adjust_hue, TF.adjust_hue, shift)]
    for fn, tv, f in cases:
        ref = torch.stack([tv(x[i], float(f[i])) for i in range(12)])
        torch.testing.assert_close(fn(x, f), ref, atol=2e-6, rtol=0, msg=fn.__name__)
    torch.testing.assert_close(color_ops.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_hsv_roundtrip_and_hue_period():
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(color_ops.hsv_to_rgb(color_ops.rgb_to_hsv(x)), x, atol=2e-6, rtol=0)
    torch.testing.assert_close(color_ops.adjust_hue(x, torch.full((4,), 0.5)),
                               color_ops.adjust_hue(x, torch.full((4,), -0.5)), atol=2e-6, rtol=0)


def test_solarize_matches_pil():
    img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(img), threshold=128))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ours = (pixel_ops.solarize(x) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, ref)
    keep = pixel_ops.solarize(x, torch.tensor([False]))
    assert torch.equal(keep, x)


def test_gaussian_blur_matches_naive_reference():
    x = torch.rand(3, 3, 9, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    size = blur_ops.blur_kernel_size(2.0)
    assert size == 13
    out = blur_ops.gaussian_blur(x, sigma, size)
    for i in range(3):
        ref = naive_blur(x[i].double().numpy(), float(sigma[i]), size)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=2e-6)
    assert blur_ops.blur_kernel_size(2.0, fixed=23) == 23
    torch.testing.assert_close(blur_ops.gaussian_kernels(sigma, 7).sum(dim=1), torch.ones(3))


# ----------------------------------------------------------------------------------------------- random rates


@pytest.mark.parametrize("impl", ["exact", "fused"])
def test_flip_grayscale_solarize_blur_rates(impl):
    n = 3000
    view = bare_view(flip_p=0.5)
    batch = make_batch([view], n)
    x = batch.views[0].float() / 255
    out = run(view, batch, flip=True, jitter_impl=impl)
    flipped = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((flipped ^ same).all())
    assert_rate(flipped, 0.5)

    out = run(dataclasses.replace(view, flip_p=0.0, grayscale_p=0.2), batch, jitter_impl=impl)
    assert_rate((out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6, 0.2)

    out = run(dataclasses.replace(view, flip_p=0.0, solarize_p=0.3), batch, jitter_impl=impl)
    solarized = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert_rate(solarized, 0.3)
    torch.testing.assert_close(out[solarized], pixel_ops.solarize(x[solarized]))

    out = run(dataclasses.replace(view, flip_p=0.0, blur_p=0.4, blur_sigma=(1.0, 2.0)), batch, jitter_impl=impl)
    assert_rate((out - x).abs().amax(dim=(1, 2, 3)) > 1e-4, 0.4)


def test_order_is_a_uniform_per_sample_permutation():
    p = sample_params(ViewConfig(), 24_000, torch.Generator().manual_seed(0))
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(24_000, 4))
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)[torch.unique(codes)]
    assert len(counts) == 24 and counts.min() > 800 and counts.max() < 1200  # expected 1000 each


# ----------------------------------------------------------------------------------------------- jitter ranges


@pytest.mark.parametrize("impl", ["exact", "fused"])
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_jitter_factor_range_on_constant_images(impl, op):
    """On a constant colour each op is x -> f x + (1 - f) ref, so the factor is recoverable per sample."""
    strength = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2}[op]
    kw = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, op: strength}
    view = bare_view(8, jitter_p=1.0, **kw)
    rgb = torch.tensor([51, 128, 179]) / 255
    out = run(view, constant_batch((51, 128, 179), 2000, size=8), jitter_impl=impl)[:, :, 0, 0]
    ref = torch.zeros(3) if op == "brightness" else (rgb @ torch.tensor(color_ops.GRAY_WEIGHTS)).expand(3)
    f = (out - ref) / (rgb - ref)  # (N, 3), identical across channels
    assert (f.amax(dim=1) - f.amin(dim=1)).max() < 1e-3
    lo, hi = 1 - strength, 1 + strength
    assert f.min() >= lo - 1e-4 and f.max() <= hi + 1e-4
    assert f.min() < lo + 0.02 and f.max() > hi - 0.02  # the whole range is used
    assert len(torch.unique((f[:, 0] * 1e4).round())) > 1500  # a fresh factor per sample


def test_hue_shift_range_exact():
    view = bare_view(8, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1)
    out = run(view, constant_batch((200, 60, 30), 2000, size=8))
    h_in = color_ops.rgb_to_hsv(torch.tensor([200, 60, 30]).reshape(1, 3, 1, 1) / 255)[0, 0, 0, 0]
    h_out = color_ops.rgb_to_hsv(out)[:, 0, 0, 0]
    shift = torch.remainder(h_out - h_in + 0.5, 1.0) - 0.5
    assert shift.abs().max() <= 0.1 + 1e-4
    assert shift.min() < -0.095 and shift.max() > 0.095


# ----------------------------------------------------------------------------------------------- full parity


def reference_pipeline(x8: torch.Tensor, view: ViewConfig, p, flip: bool) -> torch.Tensor:
    """Per image, torchvision functional ops in the drawn order + naive blur: the semantics DeviceAugment promises."""
    outs = []
    size = blur_ops.blur_kernel_size(view.blur_sigma[1], view.blur_kernel)
    for i in range(x8.shape[0]):
        img = x8[i].float() / 255
        if flip and p.flip[i]:
            img = TF.hflip(img)
        if p.jitter[i]:
            for op_id in p.order[i].tolist():
                img = TV_OPS[op_id](img, float(p.factors[i, op_id]))
        if p.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur[i]:
            img = torch.from_numpy(naive_blur(img.double().numpy(), float(p.sigma[i]), size)).float()
        if p.solarize[i]:
            img = TF.solarize(img, pixel_ops.SOLARIZE_THRESHOLD)
        outs.append(img)
    return torch.stack(outs)


def test_exact_path_equals_per_image_torchvision_reference():
    view = ViewConfig(size=8, flip_p=0.5, jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.4,
                      blur_sigma=(0.5, 1.5))
    batch = make_batch([view], 96, seed=3)
    out = DeviceAugment([view], ID_MEAN, ID_STD, seed=11, flip=True)(batch).views[0]
    p = sample_params(view, 96, torch.Generator().manual_seed(11))
    ref = reference_pipeline(batch.views[0], view, p, flip=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert p.jitter.any() and (~p.jitter).any() and p.blur.any() and p.solarize.any() and p.gray.any()


def test_normalisation_and_identity_recipe():
    view = bare_view(8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    batch = make_batch([view], 4)
    out = DeviceAugment([view], mean, std)(batch).views[0]
    m, sd = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    ref = (batch.views[0].float() / 255 - m) / sd
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- fused path


def test_fused_equals_exact_when_nothing_clamps():
    """Brightness/contrast/saturation as composed affine maps are exact, contrast mean included, in every order."""
    view = bare_view(8, jitter_p=0.9, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.0, grayscale_p=0.3)
    g = torch.Generator().manual_seed(4)
    x = (0.35 + 0.3 * torch.rand(256, 3, 8, 8, generator=g)) * 255
    batch = Batch([x.round().to(torch.uint8)], torch.zeros(256, dtype=torch.long), torch.arange(256), 1)
    exact = run(view, batch, seed=5)
    fused = run(view, batch, seed=5, jitter_impl="fused")
    torch.testing.assert_close(fused, exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hue,bound_mean,bound_worst", [(0.0, 2 / 255, 16 / 255), (0.1, 12 / 255, 30 / 255)])
def test_fused_deviation_bound(hue, bound_mean, bound_worst):
    """Measured (256 smooth random 64 px images, DINO strengths): mean |fused - exact| 0.7/255 without hue (clamping
    only), 7.6/255 with hue 0.1 (rotation about the grey axis vs the HSV hexcone). Bounds leave ~1.5x headroom."""
    view = bare_view(32, jitter_p=1.0, hue=hue)
    batch = make_batch([view], 256, seed=6, smooth=True)
    exact = run(view, batch, seed=7)
    fused = run(view, batch, seed=7, jitter_impl="fused")
    dev = (fused - exact).abs()
    assert dev.mean() < bound_mean
    assert dev.mean(dim=(1, 2, 3)).max() < bound_worst
    assert dev.mean() > 1e-4  # the paths are really different (the test would be vacuous otherwise)


# ----------------------------------------------------------------------------------------------- DeviceAugment


def dino_small(n_local: int = 3) -> list[ViewConfig]:
    """DINO's recipe (blur 1.0 / 0.1 + solarize / 0.5) at 16 px globals and 8 px locals."""
    views = DataConfig(views=dino_views(n_local=n_local, local_size=8)).expanded_views()
    return [dataclasses.replace(v, size=16) if v.role == "global" else v for v in views]


@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, True), (torch.float32, False)])
def test_contracts(dtype, channels_last):
    views = dino_small()
    batch = make_batch(views, 4)
    aug = DeviceAugment(views, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype, channels_last, seed=0)
    out = aug(batch)
    assert out.augmented and out.n_global == 2 and len(out.views) == len(views)
    assert torch.equal(out.labels, batch.labels) and torch.equal(out.indices, batch.indices)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, v in zip(out.views, views):
        assert x.shape == (4, 3, v.size, v.size) and x.dtype == dtype
        assert x.is_contiguous(memory_format=fmt)
        assert torch.isfinite(x.float()).all()
    assert [len(g) for g in aug.groups] == [1, 1, 3]  # the 3 identical local recipes are stacked


def test_rejects_bad_batches():
    views = dino_small(2)
    aug = DeviceAugment(views, ID_MEAN, ID_STD)
    batch = make_batch(views, 2)
    with pytest.raises(ValueError, match="already augmented"):
        aug(dataclasses.replace(batch, augmented=True))
    with pytest.raises(ValueError, match="views"):
        aug(dataclasses.replace(batch, views=batch.views[:-1]))
    with pytest.raises(ValueError, match="uint8"):
        aug(dataclasses.replace(batch, views=[v.float() for v in batch.views]))
    with pytest.raises(ValueError, match="ViewConfig.size"):
        aug(dataclasses.replace(batch, views=[batch.views[0][:, :, :8, :8]] + batch.views[1:]))
    with pytest.raises(ValueError, match="std"):
        DeviceAugment(views, ID_MEAN, (1.0, 0.0, 1.0))


def test_determinism_resume_and_step_seeding():
    views = dino_small()
    batch = make_batch(views, 4)
    a, b = DeviceAugment(views, ID_MEAN, ID_STD, seed=1), DeviceAugment(views, ID_MEAN, ID_STD, seed=1)
    for x, y in zip(a(batch).views, b(batch).views):
        assert torch.equal(x, y)
    c = DeviceAugment(views, ID_MEAN, ID_STD, seed=2)
    assert any(not torch.equal(x, y) for x, y in zip(a(batch).views, c(batch).views))
    state = a.state_dict()
    nxt = a(batch)
    resumed = DeviceAugment(views, ID_MEAN, ID_STD, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(nxt.views, resumed(batch).views))
    s1 = a(batch, step=17)
    fresh = DeviceAugment(views, ID_MEAN, ID_STD, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(s1.views, fresh(batch, step=17).views))
    assert any(not torch.equal(x, y) for x, y in zip(s1.views, a(batch, step=18).views))


@pytest.mark.parametrize("impl", ["exact", "fused"])
def test_samples_and_views_get_independent_parameters(impl):
    """Same image in every sample and every local view: all outputs must differ (fresh draws per sample/view)."""
    views = [dataclasses.replace(v, jitter_p=1.0) for v in dino_small(4)][2:]
    const = torch.tensor([90, 140, 60], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(8, 3, 8, 8).contiguous()
    batch = Batch([const] * 4, torch.zeros(8, dtype=torch.long), torch.arange(8), 0)
    out = DeviceAugment(views, ID_MEAN, ID_STD, seed=0, impl=AugmentConfig(jitter_impl=impl))(batch)
    colours = torch.cat([v[:, :, 0, 0] for v in out.views])  # (32, 3)
    assert len(torch.unique((colours * 1e4).round(), dim=0)) == 32


@pytest.mark.parametrize("impl", ["fused", pytest.param("exact", marks=pytest.mark.slow)])
def test_compiled_equals_eager(impl):
    """Cold inductor compile dominates (~15-30 s on 2 busy cores), so: one dtype/layout, few graphs."""
    local = dataclasses.replace(dino_small(1)[2], grayscale_p=0.5, solarize_p=0.5)
    views = [local] * (2 if impl == "fused" else 1)  # one stacked group: two compiled graphs
    batch = make_batch(views, 6, seed=8)
    kw = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), out_dtype=torch.float32, channels_last=True, seed=9,
              impl=AugmentConfig(jitter_impl=impl, cpu_impl="torch"))  # the torch ops: what other devices compile
    eager = DeviceAugment(views, flip=True, **kw)(batch)
    comp = DeviceAugment(views, flip=True, compile=True, **kw)(batch)
    for x, y in zip(eager.views, comp.views):
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_channels_last_input_gives_the_same_views():
    """FFCV delivers channels-last crops; DeviceAugment transposes them once (stacked groups included)."""
    views = dino_small(3)
    batch = make_batch(views, 4, seed=12)
    cl = dataclasses.replace(batch, views=[v.contiguous(memory_format=torch.channels_last) for v in batch.views])
    assert not cl.views[0].is_contiguous()
    a = DeviceAugment(views, ID_MEAN, ID_STD, seed=3, flip=True)(batch)
    b = DeviceAugment(views, ID_MEAN, ID_STD, seed=3, flip=True)(cl)
    for x, y in zip(a.views, b.views):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------- backend table


def test_backend_table_resolution():
    """Every stage has an eager backend; a kernel runs only when switched on and the input suits it (CPU, its dtype);
    a compiled backend only when compiling; otherwise eager."""
    stages = {stage for stage, _ in backends.BACKENDS}
    assert stages == {"color_exact", "color_fused", "blur", "finish"}
    assert all((stage, "eager") in backends.BACKENDS for stage in stages)
    fn = {key: entry.fn for key, entry in backends.BACKENDS.items()}
    u8, f32 = torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, 3, 4, 4)
    assert backends.resolve("color_exact", u8, "torch", False) is fn["color_exact", "eager"]
    assert backends.resolve("color_exact", u8, "torch", True) is fn["color_exact", "compiled"]
    assert backends.resolve("color_fused", u8, "kernel", True) is fn["color_fused", "compiled"]  # no fused kernel
    assert backends.resolve("blur", f32, "torch", True) is fn["blur", "eager"]  # the blur is never compiled
    assert backends.resolve("finish", f32, "kernel", False) is fn["finish", "eager"]
    if color_kernel.numba is not None:
        assert backends.resolve("color_exact", u8, "kernel", True) is fn["color_exact", "kernel"]  # kernel first
        assert backends.resolve("color_exact", u8.float(), "kernel", False) is fn["color_exact", "eager"]
    with pytest.raises(KeyError, match="color_exact"):
        backends.resolve("colour", u8, "torch", False)
