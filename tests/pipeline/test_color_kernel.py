"""CPU kernel of the exact colour stage (augment/color_kernel.py): per-image parity with torchvision's float ops in
each sample's random order (strong factors, hue up to 0.5), disabled ops, grayscale, layout, independence of the
batch and the thread count."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from pipeline.augment.params import sample_params
from pipeline.config import ViewConfig

pytest.importorskip("numba")
from pipeline.augment import color_kernel  # noqa: E402

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def images(n: int, h: int = 9, w: int = 11, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, h, w) with the hard cases: a grey image, grey pixels, channel ties, saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    x[0] = 128
    x[1, :, :4] = x[1, :1, :4]
    x[2, 0] = x[2, 1]
    x[3, :, 0] = 255
    x[4, :, 1] = 0
    return x


def reference(x: torch.Tensor, p, enabled, gray: bool) -> torch.Tensor:
    """Per image: torchvision float ops in the sample's order, then grayscale."""
    outs = []
    for i in range(x.shape[0]):
        img = x[i].float() / 255
        if p.jitter[i]:
            for op in p.order[i].tolist():
                if enabled[op]:
                    img = TV_OPS[op](img, float(p.factors[i, op]))
        if gray and p.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        outs.append(img)
    return torch.stack(outs)


@pytest.mark.parametrize("enabled", [(True, True, True, True), (True, False, True, False), (False, True, False, True)])
def test_matches_torchvision_per_image(enabled):
    n = 96
    x = images(n, seed=sum(enabled))
    view = ViewConfig(jitter_p=0.8, grayscale_p=0.3, hue=0.5, brightness=0.8, contrast=0.8, saturation=0.8)
    p = sample_params(view, n, torch.Generator().manual_seed(1))
    out = color_kernel.color_exact_cpu(x, p.order, p.factors, p.jitter, enabled, p.gray)
    ref = reference(x, p, enabled, gray=True)
    dev = (out - ref).abs()  # float32 rounding through up to 4 ops (hue divides by the chroma): bounds 5e-6 / 2e-7
    assert dev.amax(dim=(1, 2, 3)).max() < 5e-6 and dev.mean() < 2e-7, (dev.max(), dev.mean())
    assert out.dtype == torch.float32 and out.is_contiguous()
    no_gray = color_kernel.color_exact_cpu(x, p.order, p.factors, p.jitter, enabled)
    assert (no_gray - reference(x, p, enabled, gray=False)).abs().max() < 5e-6
    assert p.jitter.any() and (~p.jitter).any() and p.gray.any()


def test_independent_of_batch_threads_and_layout():
    x = images(12, 20, 17, seed=5)
    p = sample_params(ViewConfig(hue=0.3), 12, torch.Generator().manual_seed(2))
    run = lambda t, sl=slice(None): color_kernel.color_exact_cpu(  # noqa: E731
        t, p.order[sl], p.factors[sl], p.jitter[sl], (True,) * 4, p.gray[sl])
    full = run(x)
    for i in range(12):  # each sample alone: the same bits
        assert torch.equal(run(x[i : i + 1], slice(i, i + 1))[0], full[i])
    assert torch.equal(run(x.contiguous(memory_format=torch.channels_last)), full)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, full)


def test_rejects_bad_input():
    p = sample_params(ViewConfig(), 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="uint8"):
        color_kernel.color_exact_cpu(torch.rand(2, 3, 4, 4), p.order, p.factors, p.jitter, (True,) * 4)
