"""Every fused loss path on the device at ImageNet shapes against its reference evaluated in float64 (GPU check).

DINO/SCFS soft CE and ReSSL relation CE run their Triton kernels on CUDA; ReSA, INTL, CW-RGP and MV-MR their
``torch.compile``'d paths (inductor's Triton on CUDA). Inputs come from ``benchmarks.kernels`` (same generator,
same shapes as the benchmark); the reference sees the same values (bf16-rounded for bf16 cases) in float64. Shapes:
DINO S 12 crops (2 global + 10 local), T 2, B 32, K 65,536; ReSSL S 1, B 32 (config batch per GPU), D 512, queue
131,072; the others ``bench.SHAPES[loss, "real"]``. With FLASHSSL_CHECK_TINY=1 (CPU self-test) the shapes shrink.

Tolerances (larger than the CPU tests' because the reductions run over 65k-131k classes / 8k channels):
fp32 inputs -> loss rel 1e-4, gradient atol 1e-4 * max|grad| (whitening losses 1e-3: inverse square roots of
ill-conditioned Gram matrices amplify fp32 rounding); bf16 inputs -> loss rel 1e-3, gradient atol 2e-2 * max|grad|
(bf16 gradient store, 8-bit mantissa). An upstream gradient of 2 reaches every backward.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import kernels as bench
from losses import kernels
from tests.gpu.tensors import as_float64, map_tensors

pytestmark = pytest.mark.cuda

REAL = {**{loss: bench.SHAPES[loss, "real"] for loss in bench.LOSSES},
        "dino": dict(S=12, T=2, B=32, K=65536), "ressl": dict(S=1, B=32, D=512, K=131072)}
TINY = {"dino": dict(S=4, T=2, B=2, K=2500), "ressl": dict(S=1, B=4, D=16, K=300),
        "resa": dict(V=2, M=2, B=16, D=8, E=12), "intl": dict(V=2, B=16, D=32),
        "cw_rgp": dict(V=2, B=16, D=32, G=2, W=8), "mvmr": dict(B=8, D=16, F=(20, 30))}
LOSS_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
WHITENING = ("intl", "cw_rgp")
# Triton kernels first, then fp32, then bf16: a stage cut at its budget loses the least important cases
CASES = [(loss, dt) for loss in ("dino", "ressl") for dt in (torch.float32, torch.bfloat16)] + \
        [(loss, dt) for dt in (torch.float32, torch.bfloat16) for loss in ("resa", "intl", "cw_rgp", "mvmr")]


def _loss_and_grad(loss: str, path: str, shape: dict, x: torch.Tensor, extra) -> tuple[torch.Tensor, torch.Tensor]:
    kernels.set_fused(path == "fused")
    try:
        leaf = x.detach().clone().requires_grad_()
        out = bench._step_fn(loss, path, shape)(leaf, extra)
        (2.0 * out).backward()
        return out.detach(), leaf.grad
    finally:
        kernels.set_fused(None)


@pytest.mark.parametrize("loss,dtype", CASES, ids=[f"{loss}-{str(dt)[6:]}" for loss, dt in CASES])
def test_fused_matches_float64_reference(loss, dtype, dev, tiny, strict_fp32):
    shape = (TINY if tiny else REAL)[loss]
    x, extra = bench._make(loss, shape, str(dev), dtype)
    extra = map_tensors(extra, lambda t: t.to(dev))  # CW-RGP partitions are drawn on the CPU generator
    loss_f, grad_f = _loss_and_grad(loss, "fused", shape, x, extra)
    loss_r, grad_r = _loss_and_grad(loss, "reference", shape, x.double(), as_float64(extra))
    assert grad_f.dtype == dtype and torch.isfinite(grad_f).all() and torch.isfinite(loss_f)
    tol = GRAD_TOL[dtype] * (10 if loss in WHITENING and dtype == torch.float32 else 1)
    rel_loss = (abs(loss_f.double() - loss_r) / loss_r.abs().clamp_min(1e-12)).item()
    rel_grad = ((grad_f.double() - grad_r).abs().max() / grad_r.abs().max()).item()
    print(f"shape {shape}: loss rel err {rel_loss:.2e} (tol {LOSS_RTOL[dtype]:.0e}), max |grad err| / max |grad| "
          f"{rel_grad:.2e} (tol {tol:.0e})")  # the GPU check's report keeps this line
    torch.testing.assert_close(loss_f.double(), loss_r, rtol=LOSS_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(grad_f.double(), grad_r, rtol=0, atol=tol * grad_r.abs().max().item())
    assert grad_r.abs().max() > 0  # a vanishing reference gradient would make the check vacuous
