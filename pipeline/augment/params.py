"""Per-sample random parameters of one view recipe, drawn on the host from one seeded CPU generator.

The draw layout is fixed, so the parameters are a pure function of ``(generator state, view, n)`` and the same for
every backend: (N, 6) uniforms (one column per op's Bernoulli + the blur sigma), then (N, 4) for the jitter order and
(N, 4) for the jitter factors. Each op unit turns its uniforms into its parameters
(:func:`pipeline.augment.pixel_ops.sample_bernoulli`, :func:`pipeline.augment.color_ops.sample_jitter`,
:func:`pipeline.augment.blur_ops.sample_sigma`). Drawing on the host means the grouping (which samples blur, which op
comes first) is known without a device sync and does not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.augment.blur_ops import sample_sigma
from pipeline.augment.color_ops import sample_jitter
from pipeline.augment.pixel_ops import sample_bernoulli
from pipeline.config import ViewConfig


@dataclass
class ViewParams:
    """Per-sample random parameters of N samples (host tensors).

    Attributes:
        flip, jitter, gray, blur, solarize: (N,) bool - whether each op is applied to each sample.
        order: (N, 4) int64 - per-sample permutation of jitter op ids (brightness, contrast, saturation, hue).
        factors: (N, 4) float32 - brightness/contrast/saturation factors and the hue shift (turns).
        sigma: (N,) float32 - blur standard deviation in output pixels.
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor


def sample_params(view: ViewConfig, n: int, gen: torch.Generator) -> ViewParams:
    """Draw the parameters of ``n`` samples of ``view``; always consumes the same number of draws for a given n."""
    u = torch.rand(n, 6, generator=gen)  # columns: flip, jitter, gray, blur, blur sigma, solarize
    order_u = torch.rand(n, 4, generator=gen)
    factor_u = torch.rand(n, 4, generator=gen)
    order, factors = sample_jitter(view.brightness, view.contrast, view.saturation, view.hue, order_u, factor_u)
    return ViewParams(
        flip=sample_bernoulli(u[:, 0], view.flip_p),
        jitter=sample_bernoulli(u[:, 1], view.jitter_p),
        order=order,
        factors=factors,
        gray=sample_bernoulli(u[:, 2], view.grayscale_p),
        blur=sample_bernoulli(u[:, 3], view.blur_p),
        sigma=sample_sigma(view.blur_sigma, u[:, 4]),
        solarize=sample_bernoulli(u[:, 5], view.solarize_p),
    )
