"""MV-MR loss against a naive float64 reference written from spec mvmr.md §3.4, in the official code's units.

    a_ij = sqrt(max(|x_i - x_j|^2, 1e-4)),  A = double-centred a,  dCor = sqrt(<A,B> / sqrt(<A,A> <B,B>))
    L = mse(z_o, z_a) + sum_v mean_d relu(1 - std_b(z_v)_d) + 1 - dCor(z_o/32, z_a/32) + sum_r T_r(psi_r / s_r, z_a/32)
    T_r = dCor (code) or 1 - dCor (paper / teacher)

The reference divides by 32 and clamps at 1e-4 like the official code; the implementation keeps natural units and
moves the clamp instead, so agreement also checks that re-expression. Loops over sample pairs; gradients of the
naive loops by autograd (independent of the vectorised Gram-expansion implementation) and by finite differences.
"""

from __future__ import annotations

import pytest
import torch

from losses.mvmr import DCorTarget, MVMRLoss, distance_correlation, double_centre, pairwise_distances

B, D, P = 6, 5, 7
CLAMP, SCALE = 1e-4, 32.0


def naive_dcor(x: torch.Tensor, y: torch.Tensor, clamp: float = CLAMP) -> torch.Tensor:
    """Double loops over sample pairs; differentiable through autograd on float64 scalars."""
    n = x.shape[0]

    def centred(v: torch.Tensor) -> list[list[torch.Tensor]]:
        a = [[torch.sqrt(torch.clamp(((v[i] - v[j]) ** 2).sum(), min=clamp)) for j in range(n)] for i in range(n)]
        row = [sum(a[i]) / n for i in range(n)]
        col = [sum(a[i][j] for i in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return [[a[i][j] - row[i] - col[j] + grand for j in range(n)] for i in range(n)]

    a, b = centred(x), centred(y)
    cov = sum(a[i][j] * b[i][j] for i in range(n) for j in range(n)) / n**2
    var_x = sum(a[i][j] ** 2 for i in range(n) for j in range(n)) / n**2
    var_y = sum(b[i][j] ** 2 for i in range(n) for j in range(n)) / n**2
    return torch.sqrt(cov / torch.sqrt(var_x * var_y))


def naive_std_hinge(z: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    n, d = z.shape
    total = 0.0
    for k in range(d):
        mean = sum(z[i, k] for i in range(n)) / n
        std = torch.sqrt(sum((z[i, k] - mean) ** 2 for i in range(n)) / (n - 1))
        total = total + torch.relu(margin - std)
    return total / d


def naive_loss(z_o, z_a, reps: list[tuple[torch.Tensor, float, bool]], margin: float = 1.0) -> torch.Tensor:
    n, d = z_o.shape
    mse = sum((z_o[i, k] - z_a[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    loss = mse + naive_std_hinge(z_a, margin) + naive_std_hinge(z_o, margin)
    loss = loss + 1 - naive_dcor(z_o / SCALE, z_a / SCALE)
    for feat, scale, maximise in reps:
        dc = naive_dcor(feat.flatten(1) / scale, z_a / SCALE)
        loss = loss + (1 - dc if maximise else dc)
    return loss


def _data(seed: int = 0, near_duplicates: bool = True):
    g = torch.Generator().manual_seed(seed)
    z_o = torch.randn(B, D, generator=g, dtype=torch.float64) * 0.8
    z_a = z_o + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    img = torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64)
    hog = torch.rand(B, P, generator=g, dtype=torch.float64) * 0.05
    if near_duplicates:  # squared distances below the clamp: z_a rows 0/1 (scaled units), hog rows 2/3
        z_a[1] = z_a[0] + 0.05
        hog[3] = hog[2] + 1e-3
    return z_o, z_a, img, hog


def _targets(img, hog, maximise: bool) -> dict[str, DCorTarget]:
    return {"full_img": DCorTarget(img, CLAMP * SCALE**2, maximise), "full_img_hog": DCorTarget(hog, CLAMP, maximise)}


def test_clamp_is_active_in_the_test_data():
    z_o, z_a, img, hog = _data()
    assert ((z_a[0] - z_a[1]) / SCALE).pow(2).sum() < CLAMP
    assert (hog[2] - hog[3]).pow(2).sum() < CLAMP


@pytest.mark.parametrize("seed", [0, 1])
def test_distance_correlation_matches_naive(seed):
    z_o, z_a, img, hog = _data(seed)
    got = distance_correlation(z_o, z_a, CLAMP * SCALE**2, CLAMP * SCALE**2)
    ref = naive_dcor(z_o / SCALE, z_a / SCALE)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(distance_correlation(hog, z_a, CLAMP, CLAMP * SCALE**2),
                               naive_dcor(hog, z_a / SCALE), rtol=1e-9, atol=0)


@pytest.mark.parametrize("maximise", [False, True])
def test_loss_and_gradients_match_naive(maximise):
    z_o, z_a, img, hog = _data()
    z_o.requires_grad_(True)
    z_a.requires_grad_(True)
    loss, logs = MVMRLoss(1.0, CLAMP * SCALE**2)(z_o, z_a, _targets(img, hog, maximise))
    g_o, g_a = torch.autograd.grad(loss, [z_o, z_a])
    ref = naive_loss(z_o, z_a, [(img, SCALE, maximise), (hog, 1.0, maximise)])
    r_o, r_a = torch.autograd.grad(ref, [z_o, z_a])
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_o, r_o, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g_a, r_a, rtol=1e-7, atol=1e-12)
    assert set(logs) == {"mse", "std", "dc_zz", "dc_full_img", "dc_full_img_hog"}
    torch.testing.assert_close(sum(logs.values()), loss.detach(), rtol=1e-12, atol=0)


def test_code_sign_adds_dcor_and_paper_sign_maximises_it():
    z_o, z_a, img, hog = _data()
    loss_fn = MVMRLoss()
    base, _ = loss_fn(z_o, z_a, {})
    code, logs_code = loss_fn(z_o, z_a, _targets(img, hog, False))
    paper, logs_paper = loss_fn(z_o, z_a, _targets(img, hog, True))
    dc_img = naive_dcor(img.flatten(1) / SCALE, z_a / SCALE)
    torch.testing.assert_close(logs_code["dc_full_img"], dc_img, rtol=1e-9, atol=0)
    torch.testing.assert_close(logs_paper["dc_full_img"], 1 - dc_img, rtol=1e-9, atol=0)
    torch.testing.assert_close(code - base, logs_code["dc_full_img"] + logs_code["dc_full_img_hog"], rtol=1e-9, atol=0)


def test_gradcheck_of_the_implementation():
    z_o, z_a, img, hog = _data(near_duplicates=False)
    loss_fn = MVMRLoss()
    targets = _targets(img, hog, False)

    def fn(a, b):
        return loss_fn(a, b, targets)[0]

    assert torch.autograd.gradcheck(fn, (z_o.requires_grad_(True), z_a.requires_grad_(True)), eps=1e-6, atol=1e-7)


def test_targets_get_no_gradient():
    z_o, z_a, img, hog = _data()
    hog.requires_grad_(True)
    z_a.requires_grad_(True)
    loss, _ = MVMRLoss()(z_o, z_a, _targets(img, hog, False))
    loss.backward()
    assert hog.grad is None and z_a.grad is not None


def test_distance_correlation_invariants():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 9, generator=g, dtype=torch.float64)
    y = torch.randn(12, 4, generator=g, dtype=torch.float64)
    dc = distance_correlation(x, y)
    torch.testing.assert_close(distance_correlation(y, x), dc, rtol=1e-12, atol=0)  # symmetric
    torch.testing.assert_close(distance_correlation(x, x), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    torch.testing.assert_close(distance_correlation(x @ q + 3.0, y), dc, rtol=1e-10, atol=0)  # rigid motions
    assert 0 < dc < 1
    # the /32 "fp16 trick" is exactly a moved clamp (power-of-two scaling is exact in floating point)
    x32, y32 = x.float() * 5, y.float() * 5
    torch.testing.assert_close(distance_correlation(x32 / 32, y32 / 32, 1e-4, 1e-4),
                               distance_correlation(x32, y32, 1e-4 * 1024, 1e-4 * 1024), rtol=1e-6, atol=0)


def test_pairwise_and_centring_shapes_and_diagonal():
    x = torch.randn(5, 3, dtype=torch.float64)
    a = pairwise_distances(x, 1e-4)
    torch.testing.assert_close(a.diagonal(), torch.full((5,), 0.01, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    c = double_centre(a)
    torch.testing.assert_close(c.sum(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(c.sum(1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    z_o, z_a = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    feat = torch.randn(16, 3, 8, 8, generator=g)
    targets = {"full_img": DCorTarget(feat, CLAMP * SCALE**2, False)}
    loss_fn = MVMRLoss()
    ref, _ = loss_fn(z_o, z_a, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same, _ = loss_fn(z_o, z_a, targets)  # fp32 inputs: the island must keep every op in fp32
        low, _ = loss_fn(z_o.bfloat16(), z_a.bfloat16(), targets)  # bf16 embeddings from an autocast projector
    assert same.dtype == torch.float32 and low.dtype == torch.float32
    torch.testing.assert_close(same, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(low, ref, rtol=1e-2, atol=0)


def test_bad_shapes_raise():
    loss_fn = MVMRLoss()
    with pytest.raises(ValueError, match="both be"):
        loss_fn(torch.randn(4, 3), torch.randn(4, 5), {})
    with pytest.raises(ValueError, match="at least 2"):
        loss_fn(torch.randn(1, 3), torch.randn(1, 3), {})
    with pytest.raises(ValueError, match="batch"):
        loss_fn(torch.randn(4, 3), torch.randn(4, 3), {"x": DCorTarget(torch.randn(5, 2), 1e-4, False)})
    with pytest.raises(ValueError, match="distance_correlation"):
        distance_correlation(torch.randn(4, 3), torch.randn(3, 3))


def test_loss_module_is_stateless():
    assert MVMRLoss().state_dict() == {}
