"""DINOLoss against a naive float64 reference written from spec scfs.md §2.4(a).

    P_v = softmax((o^t(g_v) - c) / T)
    L   = 1/#pairs sum_{v} sum_{x != v} mean_b CE(P_v, log_softmax(o^s(x) / tau))
    c  <- m c + (1 - m) mean_{v, b} o^t(g_v)_b                (center from *before* the update is used in the loss)
"""

from __future__ import annotations

import math

import pytest
import torch

from losses.dino import DINOLoss

S, T, B, K = 5, 2, 3, 7
TAU_S, TAU_T, M = 0.1, 0.04, 0.9


def naive_softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


def centered_probs(teacher, center, tau_t=TAU_T):
    """P_v[b] = softmax((o^t(g_v)_b - c) / T) for every teacher crop v and image b."""
    return [[naive_softmax([(t - c) / tau_t for t, c in zip(row, center)]) for row in crop] for crop in teacher]


def naive_sinkhorn_probs(teacher, eps=TAU_T, iters=3):
    """DINOv2 / SwAV Sinkhorn-Knopp written from the equations, in plain floats: the N = T*B teacher rows and the K
    prototypes; Q = exp(t / eps) / sum(exp(t / eps)); repeat: scale each prototype's total to 1/K, then each row's
    total to 1/N; return N * Q (every row sums to 1)."""
    rows = [(v, b) for v in range(len(teacher)) for b in range(len(teacher[0]))]
    k_dim, n = len(teacher[0][0]), len(rows)
    q = {(r, k): math.exp(teacher[r[0]][r[1]][k] / eps) for r in rows for k in range(k_dim)}
    total = sum(q.values())
    q = {key: val / total for key, val in q.items()}
    for _ in range(iters):
        for k in range(k_dim):
            mass = sum(q[(r, k)] for r in rows)
            for r in rows:
                q[(r, k)] /= mass * k_dim
        for r in rows:
            mass = sum(q[(r, k)] for k in range(k_dim))
            for k in range(k_dim):
                q[(r, k)] /= mass * n
    return [[[n * q[((v, b), k)] for k in range(k_dim)] for b in range(len(teacher[0]))] for v in range(len(teacher))]


def naive_dino_loss(student, teacher, center, tau_t=TAU_T, tau_s=TAU_S, probs=None) -> float:
    """Triple loop over (teacher crop, student crop, image) in plain Python floats. ``probs`` replaces the centered
    teacher softmax (Sinkhorn centering)."""
    probs = probs or centered_probs(teacher, center, tau_t)
    n_s, n_t, batch = len(student), len(teacher), len(student[0])
    total, pairs = 0.0, 0
    for v in range(n_t):
        for x in range(n_s):
            if x == v:
                continue
            ce_sum = 0.0
            for b in range(batch):
                p = probs[v][b]
                z = [s / tau_s for s in student[x][b]]
                log_norm = max(z) + math.log(sum(math.exp(zj - max(z)) for zj in z))
                ce_sum += -sum(pj * (zj - log_norm) for pj, zj in zip(p, z))
            total += ce_sum / batch
            pairs += 1
    return total / pairs


def naive_grad(student, teacher, center, tau_t=TAU_T, tau_s=TAU_S, probs=None):
    """dL/ds[x][b][j] = (1/(pairs B tau_s)) sum_{v != x} (softmax(s[x][b]/tau_s)_j - P_v[b]_j)."""
    probs = probs or centered_probs(teacher, center, tau_t)
    n_s, n_t, batch = len(student), len(teacher), len(student[0])
    pairs = n_t * n_s - n_t
    grad = [[[0.0] * len(center) for _ in range(batch)] for _ in range(n_s)]
    for x in range(n_s):
        for b in range(batch):
            q = naive_softmax([s / tau_s for s in student[x][b]])
            for v in range(n_t):
                if v == x:
                    continue
                p = probs[v][b]
                for j in range(len(center)):
                    grad[x][b][j] += (q[j] - p[j]) / (pairs * batch * tau_s)
    return torch.tensor(grad, dtype=torch.float64)


def naive_center(center, teacher, m=M):
    n_t, batch = len(teacher), len(teacher[0])
    return [m * c + (1 - m) * sum(teacher[v][b][j] for v in range(n_t) for b in range(batch)) / (n_t * batch)
            for j, c in enumerate(center)]


def test_loss_gradient_and_center_match_naive_reference_over_steps():
    loss_fn = DINOLoss(K, TAU_S, M).double()
    center = [0.0] * K
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        student = (torch.rand(S, B, K, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        teacher = torch.rand(T, B, K, generator=g, dtype=torch.float64) * 2 - 1
        loss = loss_fn(student, teacher, TAU_T)
        loss.backward()
        ref = naive_dino_loss(student.tolist(), teacher.tolist(), center)
        assert loss.dtype == torch.float64
        assert loss.item() == pytest.approx(ref, rel=1e-9)
        torch.testing.assert_close(student.grad, naive_grad(student.tolist(), teacher.tolist(), center),
                                   rtol=1e-7, atol=1e-12)
        loss_fn.reduce_center_update(teacher)
        loss_fn.apply_center_update()
        center = naive_center(center, teacher.tolist())
        torch.testing.assert_close(loss_fn.center, torch.tensor(center, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert loss_fn.center.abs().sum() > 0  # the center moved


def test_sinkhorn_centering_matches_naive_reference_over_steps():
    """centering="sinkhorn": targets are the Sinkhorn-Knopp assignment of all teacher rows (rows sum to 1, prototypes
    get equal mass), loss and gradient follow from them; the center is still tracked but never used."""
    loss_fn = DINOLoss(K, TAU_S, M, centering="sinkhorn").double()
    g = torch.Generator().manual_seed(5)
    center = [0.0] * K
    for _ in range(3):
        student = (torch.rand(S, B, K, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        teacher = torch.rand(T, B, K, generator=g, dtype=torch.float64) * 2 - 1
        probs = naive_sinkhorn_probs(teacher.tolist())
        p = torch.tensor(probs, dtype=torch.float64)
        torch.testing.assert_close(p.sum(-1), torch.ones(T, B, dtype=torch.float64))  # reference sanity
        assert not torch.allclose(p, torch.tensor(centered_probs(teacher.tolist(), center), dtype=torch.float64))
        loss = loss_fn(student, teacher, TAU_T)
        loss.backward()
        assert loss.item() == pytest.approx(naive_dino_loss(student.tolist(), teacher.tolist(), center,
                                                            probs=probs), rel=1e-9)
        torch.testing.assert_close(student.grad, naive_grad(student.tolist(), teacher.tolist(), center, probs=probs),
                                   rtol=1e-7, atol=1e-12)
        loss_fn.reduce_center_update(teacher)
        loss_fn.apply_center_update()
        center = naive_center(center, teacher.tolist())
        torch.testing.assert_close(loss_fn.center, torch.tensor(center, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_center_update_waits_for_apply_and_is_not_done_in_forward():
    loss_fn = DINOLoss(K)
    teacher = torch.rand(T, B, K)
    loss_fn(torch.rand(S, B, K), teacher, TAU_T)
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn.reduce_center_update(teacher)
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(dim=(0, 1)))


def test_center_update_takes_the_teacher_sum_it_is_handed():
    """The column sum handed to reduce_center_update is the one averaged into the center (over T * B rows); without
    one the sum of the teacher logits is taken, and the reference loss path hands none out."""
    g = torch.Generator().manual_seed(7)
    teacher = torch.rand(T, B, K, generator=g, dtype=torch.float64)
    loss_fn = DINOLoss(K).double()
    loss, teacher_sum = loss_fn.loss_and_teacher_sum(torch.rand(S, B, K, dtype=torch.float64), teacher, TAU_T)
    assert teacher_sum is None and loss.dim() == 0
    loss_fn.reduce_center_update(teacher)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(dim=(0, 1)), rtol=1e-12, atol=0)
    handed = torch.rand(K, generator=g, dtype=torch.float64) * T * B
    before = loss_fn.center.clone()
    loss_fn.reduce_center_update(teacher, handed)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.9 * before + 0.1 * handed / (T * B), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=rf"center batch sum must have shape \({K},\)"):
        loss_fn.reduce_center_update(teacher, handed[:-1])


def test_same_crop_pairs_are_excluded():
    """With S = T = 2 only the cross pairs (t0, s1), (t1, s0) count, so swapping the teacher crops changes the loss."""
    student = torch.rand(T, B, K, dtype=torch.float64)
    teacher = torch.rand(T, B, K, dtype=torch.float64)
    loss_fn = DINOLoss(K).double()
    base = loss_fn(student, teacher, TAU_T)
    swapped = loss_fn(student, teacher.flip(0), TAU_T)
    assert not torch.isclose(base, swapped)
    ref = naive_dino_loss(student.tolist(), teacher.tolist(), [0.0] * K)
    assert base.item() == pytest.approx(ref, rel=1e-9)


def test_bad_width_raises():
    with pytest.raises(ValueError, match="logit width"):
        DINOLoss(K)(torch.rand(S, B, K + 1), torch.rand(T, B, K + 1), TAU_T)


def test_bf16_autocast():
    """The loss math runs in fp32 under autocast: fp32 inputs give the fp32 loss exactly; inputs rounded to bf16 (as a
    bf16 network produces them) stay within 0.1% of the fp32 loss for logits in [-1, 1] (bf16 rounding <= 2^-9
    relative, amplified by 1/T_t = 25 in the teacher softmax, averages out over K and B)."""
    g = torch.Generator().manual_seed(3)
    student = torch.rand(S, 16, 512, generator=g) * 2 - 1
    teacher = torch.rand(T, 16, 512, generator=g) * 2 - 1
    loss_fn = DINOLoss(512)
    ref = loss_fn(student, teacher, TAU_T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = loss_fn(student, teacher, TAU_T)
        low = loss_fn(student.bfloat16(), teacher.bfloat16(), TAU_T)
    assert same.dtype == torch.float32 and low.dtype == torch.float32
    torch.testing.assert_close(same, ref)
    assert abs(low.item() - ref.item()) <= 1e-3 * ref.item()
