"""ReSA loss and Sinkhorn vs a naive float64 reference written from the equations (spec resa.md §1.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.resa import ReSALoss, self_assignment
from losses.sinkhorn import sinkhorn_knopp


def naive_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """Spec orientation: Q = exp(S / eps)^T has the K momentum samples as rows and the B online samples as columns."""
    n_b, n_k = scores.shape
    q = [[math.exp(scores[i, j].item() / eps) for i in range(n_b)] for j in range(n_k)]  # (K, B)
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(n_iters):
        q = [[x / sum(row) / n_k for x in row] for row in q]  # rows: divide by row sum and K
        col = [sum(q[j][i] for j in range(n_k)) for i in range(n_b)]
        q = [[q[j][i] / col[i] / n_b for i in range(n_b)] for j in range(n_k)]  # columns: by column sum and B
    return torch.tensor([[n_b * q[j][i] for j in range(n_k)] for i in range(n_b)], dtype=torch.float64)  # (B, K)


def naive_resa_loss(z, h, z_bar, h_bar, tau, eps=0.05, n_iters=3):
    """z (V, B, D), h (B, E), z_bar (M, B, D), h_bar (B, E) -> scalar; every vector is L2-normalised here."""
    h, h_bar = F.normalize(h, dim=-1), F.normalize(h_bar, dim=-1)
    scores = torch.tensor([[torch.dot(h[i], h_bar[j]).item() for j in range(h_bar.shape[0])]
                           for i in range(h.shape[0])], dtype=torch.float64)
    a = naive_sinkhorn(scores, eps, n_iters)
    zn, zbn = F.normalize(z, dim=-1), F.normalize(z_bar, dim=-1)
    pair_losses = []
    for q in range(z.shape[0]):
        for v in range(z_bar.shape[0]):
            if q == v:
                continue
            rows = []
            for i in range(z.shape[1]):
                logits = torch.stack([torch.dot(zn[q, i], zbn[v, j]) / tau for j in range(z_bar.shape[1])])
                log_p = logits - torch.logsumexp(logits, dim=0)
                rows.append(-(a[i] * log_p).sum())
            pair_losses.append(torch.stack(rows).mean())
    return torch.stack(pair_losses).mean(), a


def _inputs(n_views: int, b: int = 6, d: int = 5, e: int = 7, n_mom: int = 2):
    z = torch.randn(n_views, b, d, dtype=torch.float64, requires_grad=True)
    h = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    z_bar = torch.randn(n_mom, b, d, dtype=torch.float64, requires_grad=True)
    h_bar = h.detach() + 0.3 * torch.randn(b, e, dtype=torch.float64)  # correlated, like two weak-view encodings
    return z, h, z_bar, h_bar.requires_grad_(True)


def test_sinkhorn_matches_reference_and_rows_sum_to_one():
    scores = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1) @ \
        F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1).T  # (6 online, 9 momentum)
    a = sinkhorn_knopp(scores, eps=0.05, n_iters=3)
    torch.testing.assert_close(a, naive_sinkhorn(scores, 0.05, 3), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(6, dtype=torch.float64), rtol=1e-12, atol=0)


def test_sinkhorn_converges_to_balanced_columns():
    scores = torch.rand(8, 8, dtype=torch.float64) * 2 - 1
    a = sinkhorn_knopp(scores, eps=0.5, n_iters=200)
    torch.testing.assert_close(a.sum(dim=0), torch.ones(8, dtype=torch.float64), rtol=1e-6, atol=0)


def test_sinkhorn_is_finite_where_plain_exp_overflows_fp32():
    scores = torch.rand(5, 4) * 2 - 1  # exp(1 / 0.01) = inf in fp32 without the bound shift
    a = sinkhorn_knopp(scores, eps=0.01, n_iters=3)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.double(), naive_sinkhorn(scores.double(), 0.01, 3), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_views", [2, 4])  # 2 views: pairs (0,1),(1,0); 4 views: 2 + 2*2 pairs
def test_loss_and_grads_match_reference(n_views: int):
    z, h, z_bar, h_bar = _inputs(n_views)
    loss, a = ReSALoss(temperature=0.4, sinkhorn_eps=0.05, sinkhorn_iters=3, gather=False)(z, h, z_bar, h_bar)
    z_ref = z.detach().clone().requires_grad_(True)
    ref, a_ref = naive_resa_loss(z_ref, h.detach(), z_bar.detach(), h_bar.detach(), 0.4)
    torch.testing.assert_close(a, a_ref, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-7, atol=1e-12)
    assert h.grad is None and z_bar.grad is None and h_bar.grad is None  # only the online embeddings get gradient


def test_same_view_pairs_are_skipped():
    """With 2 views the loss is the mean of the cross pairs (q=0, v=1) and (q=1, v=0); (0,0) and (1,1) never count."""
    z, h, z_bar, h_bar = (t.detach() for t in _inputs(2))
    loss, a = ReSALoss(gather=False)(z, h, z_bar, h_bar)

    def pair(q: int, v: int) -> torch.Tensor:
        logits = F.normalize(z[q], dim=-1) @ F.normalize(z_bar[v], dim=-1).T / 0.4
        return -(a * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()

    cross = (pair(0, 1) + pair(1, 0)) / 2
    all_pairs = sum(pair(q, v) for q in range(2) for v in range(2)) / 4
    torch.testing.assert_close(loss, cross)
    assert not torch.allclose(loss, all_pairs)


def test_assignment_is_near_identity_for_distinct_samples():
    h = F.normalize(torch.randn(16, 64, dtype=torch.float64), dim=-1)
    a = self_assignment(h, h, eps=0.05, n_iters=3)
    assert (a.diagonal() > 0.9).all()


def test_bad_shapes_raise():
    loss_fn = ReSALoss(gather=False)
    with pytest.raises(ValueError, match="expected z"):
        loss_fn(torch.randn(2, 4, 5), torch.randn(4, 3), torch.randn(3, 4, 5), torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected h"):
        loss_fn(torch.randn(2, 4, 5), torch.randn(3, 3), torch.randn(2, 4, 5), torch.randn(3, 3))


def test_fp32_under_bf16_autocast():
    z, h, z_bar, h_bar = (t.detach().float() for t in _inputs(3, b=16, d=32, e=48))
    loss_fn = ReSALoss(gather=False)
    ref, _ = loss_fn(z, h, z_bar, h_bar)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same, a = loss_fn(z, h, z_bar, h_bar)
        rounded, _ = loss_fn(z.bfloat16(), h.bfloat16(), z_bar.bfloat16(), h_bar.bfloat16())
    assert same.dtype == torch.float32 and a.dtype == torch.float32 and rounded.dtype == torch.float32
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(rounded, ref, rtol=2e-2, atol=0)  # bf16 input rounding only (stated tolerance)
