"""Direct per-sample Gaussian blur (pipeline/augment/blur_kernel.py): exactness vs float64 / torchvision / the
convolution, in-place selection, independence of the batch and thread count, sigma distribution through
DeviceAugment, the backend choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from pipeline.augment import backends, blur_kernel, blur_ops
from pipeline.augment.gpu_augment import DeviceAugment
from pipeline.augment.params import sample_params
from pipeline.batch import Batch
from pipeline.config import AugmentConfig, ViewConfig
from tests.pipeline.naive_ops import naive_blur

pytest.importorskip("numba")
ID = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # normalisation off


def rand(shape, seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("h,w", [(9, 7), (3, 20), (17, 2)])  # images narrower than the 6-pixel radius included
def test_direct_blur_matches_float64_reference(h, w, layout):
    sigma = torch.tensor([0.1, 0.3, 0.77, 1.0, 1.6, 2.0])
    x = rand((6, 3, h, w), seed=h)
    out = blur_kernel.blur_selected_cpu_(x.clone(memory_format=layout), torch.ones(6, dtype=torch.bool), sigma, 13)
    assert out.is_contiguous(memory_format=layout)
    for i in range(6):
        ref = naive_blur(x[i].double().numpy(), float(sigma[i]), 13)
        assert np.abs(out[i].double().numpy() - ref).max() < 2e-6, f"sigma={float(sigma[i])}"


def test_direct_blur_matches_torchvision_away_from_borders():
    """torchvision's GaussianBlur pads by reflection, PIL (and we) by edge replication: equal wherever the kernel
    does not reach the border. Bound: max |diff| 2e-6 per image (float32 rounding; measured ~3e-7)."""
    x = rand((8, 3, 40, 36), seed=1)
    sigma = 0.1 + 1.9 * rand((8,), seed=2)
    out = blur_kernel.blur_selected_cpu_(x.clone(), torch.ones(8, dtype=torch.bool), sigma, 13)
    for i in range(8):
        ref = TF.gaussian_blur(x[i], kernel_size=[13, 13], sigma=[float(sigma[i])] * 2)
        assert (out[i, :, 6:-6, 6:-6] - ref[:, 6:-6, 6:-6]).abs().max() < 2e-6


def test_direct_blur_equals_convolution_path_and_keeps_unselected_samples():
    x = rand((10, 3, 24, 31), seed=3)
    sigma = 0.1 + 1.9 * rand((10,), seed=4)
    mask = torch.tensor([True, False, True, True, False, False, True, False, True, True])
    out = blur_kernel.blur_selected_cpu_(x.clone(), mask, sigma, 13)
    conv = blur_ops.gaussian_blur(x[mask], sigma[mask], 13)
    assert (out[mask] - conv).abs().max() < 1e-6
    assert torch.equal(out[~mask], x[~mask])  # bit-identical: untouched in place
    eager = backends.resolve("blur", x, "torch", False)  # what non-CPU devices run
    assert backends.resolve("blur", x, "kernel", False) is blur_kernel.blur_selected_cpu_
    assert backends.resolve("blur", x.double(), "kernel", False) is eager  # the kernel takes float32 only
    fallback = eager(x, mask, sigma, 13)  # convolution on the subset, a new tensor
    assert torch.equal(fallback[mask], conv) and torch.equal(fallback[~mask], x[~mask])


def test_in_place_contract_and_non_contiguous_input():
    x = rand((4, 3, 12, 12), seed=5)
    mask, sigma = torch.ones(4, dtype=torch.bool), torch.full((4,), 1.5)
    y = x.clone()
    assert blur_kernel.blur_selected_cpu_(y, mask, sigma, 13) is y and not torch.equal(y, x)
    cl = x.contiguous(memory_format=torch.channels_last)
    # NHWC: in place, same bits
    assert blur_kernel.blur_selected_cpu_(cl, mask, sigma, 13) is cl and torch.equal(cl, y)
    strided = x.transpose(2, 3)  # neither layout: blurred as a channels-last copy, the input is left alone
    out = blur_kernel.blur_selected_cpu_(strided, mask, sigma, 13)
    assert torch.equal(strided, x.transpose(2, 3)) and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, y.transpose(2, 3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="odd size"):
        blur_kernel.blur_selected_cpu_(x, mask, sigma, 12)
    with pytest.raises(ValueError, match="float32 CPU"):
        blur_kernel.blur_selected_cpu_(x.double(), mask, sigma, 13)


def test_result_is_independent_of_batch_composition_and_threads():
    numba = pytest.importorskip("numba")
    x = rand((6, 3, 20, 20), seed=6)
    sigma = 0.1 + 1.9 * rand((6,), seed=7)
    full = blur_kernel.blur_selected_cpu_(x.clone(), torch.ones(6, dtype=torch.bool), sigma, 13)
    for i in range(6):  # each sample alone, with its own sigma: the same bits
        one = torch.ones(1, dtype=torch.bool)
        alone = blur_kernel.blur_selected_cpu_(x[i : i + 1].clone(), one, sigma[i : i + 1], 13)
        assert torch.equal(alone[0], full[i])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the kernel takes torch's thread budget
        single = blur_kernel.blur_selected_cpu_(x.clone(), torch.ones(6, dtype=torch.bool), sigma, 13)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, full) and numba.get_num_threads() >= 1


def test_significant_radius_skips_only_negligible_taps():
    sigma = torch.tensor([0.1, 0.3, 1.0, 2.0])
    k = blur_ops.gaussian_kernels(sigma, 13)
    r = blur_kernel.significant_radius(k)
    assert r.tolist()[-1] == 6 and r.tolist()[0] <= 1 and torch.all(r[:-1] <= r[1:])
    for i in range(4):  # the skipped mass is negligible, the kept outermost tap is not
        skipped = k[i, : 6 - r[i]].sum() * 2
        assert skipped < 1e-8 and k[i, 6 - r[i]] >= blur_kernel.NEGLIGIBLE_TAP * k[i, 6]


def test_sigma_distribution_through_device_augment():
    """Impulse images: the output is the sample's 2-D kernel, so its sigma is recoverable from the ratio of the
    centre tap to its neighbour (k1 / k0 = exp(-1 / (2 sigma^2))). Sigmas must be the drawn ones, uniform on the
    configured range, a fresh one per sample; the blur rate must be blur_p."""
    n, size = 1200, 15
    view = ViewConfig(size=size, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.5, blur_sigma=(0.3, 2.0))
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[:, :, size // 2, size // 2] = 255
    out = DeviceAugment([view], *ID, seed=3)(Batch([x], torch.zeros(n, dtype=torch.long), torch.arange(n), 1))
    p = sample_params(view, n, torch.Generator().manual_seed(3))
    centre = out.views[0][:, 0, size // 2, size // 2].double()
    blurred = centre < 1.0
    assert torch.equal(blurred, p.blur)
    ratio = out.views[0][blurred, 0, size // 2, size // 2 + 1].double() / centre[blurred]
    sigma = torch.sqrt(-1.0 / (2.0 * torch.log(ratio)))
    torch.testing.assert_close(sigma, p.sigma[blurred].double(), atol=2e-4, rtol=1e-4)
    m = int(blurred.sum())
    assert abs(m / n - 0.5) < 4.5 * math.sqrt(0.25 / n)
    u = ((sigma - 0.3) / 1.7).sort().values  # uniform on [0, 1]: Kolmogorov-Smirnov distance, alpha ~ 0.001
    ks = (u - torch.arange(1, m + 1, dtype=torch.float64) / m).abs().max()
    assert ks < 1.95 / math.sqrt(m)
    assert len(torch.unique((sigma * 1e4).round())) > 0.95 * m  # a fresh sigma per sample


@pytest.mark.parametrize("jitter", ["exact", "fused"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpu_impl_choice_through_device_augment(layout, jitter):
    """``AugmentConfig.cpu_impl``: "kernel" and "torch" give the same views (whole DINO-like recipe, both input
    layouts: FFCV delivers channels-last crops); a bad value is a ConfigError naming the key."""
    from runtime.config_loader import ConfigError, from_dict

    view = ViewConfig(size=24, blur_p=0.6, solarize_p=0.3, grayscale_p=0.3)
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (16, 3, 24, 24), generator=g, dtype=torch.uint8).contiguous(memory_format=layout)
    batch = Batch([x], torch.zeros(16, dtype=torch.long), torch.arange(16), 1)
    outs = [DeviceAugment([view], (0.4, 0.5, 0.6), (0.2, 0.3, 0.25), seed=4, flip=True,
                          impl=AugmentConfig(jitter_impl=jitter, cpu_impl=impl))(batch).views[0]
            for impl in ("kernel", "torch")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    assert from_dict(AugmentConfig, {"cpu_impl": "torch"}).cpu_impl == "torch"
    with pytest.raises(ConfigError, match="augment.cpu_impl"):
        from_dict(AugmentConfig, {"cpu_impl": "numba"}, "augment")
