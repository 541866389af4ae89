"""SCFS shallow losses against a naive float64 reference written from spec scfs.md §2.4(b)-(c).

Per stage k (G = 2 global crops, L local crops)::

    L^g_k = 1/2 [ mean_b CE(softmax((t_1 - c_k)/T), log_softmax(s_2/tau)) + mean_b CE(softmax((t_2 - c_k)/T), ...s_1) ]
    L^l_k = 1/L sum_i mean_b CE(softmax(v_i/T), log_softmax(s_{l_i}/tau))          (not centred)
    total = sum_k (L^g_k + L^l_k) / 2
    c_k  <- m c_k + (1 - m) mean_{g, b} t_g                                         (global teacher outputs only)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.scfs import SCFSShallowLoss, shallow_global_loss, shallow_local_loss

N_STAGES, G, L, B, D = 3, 2, 4, 3, 6
TAU_S, TAU_T, M = 0.1, 0.05, 0.9


def naive_ce(target_logits: list[float], student_logits: list[float], tau_t: float, tau_s: float) -> float:
    """-sum_j softmax(target/tau_t)_j * log_softmax(student/tau_s)_j with explicit exp/log."""
    zt = [v / tau_t for v in target_logits]
    et = [math.exp(v - max(zt)) for v in zt]
    p = [v / sum(et) for v in et]
    zs = [v / tau_s for v in student_logits]
    log_norm = max(zs) + math.log(sum(math.exp(v - max(zs)) for v in zs))
    return -sum(pj * (zj - log_norm) for pj, zj in zip(p, zs))


def naive_stage(s_glob, s_loc, t_glob, t_search, center) -> tuple[float, float]:
    """(L^g, L^l) of one stage from nested lists."""
    centred = [[[x - c for x, c in zip(t_glob[g][b], center)] for b in range(B)] for g in range(G)]
    lg = 0.5 * sum(sum(naive_ce(centred[g][b], s_glob[1 - g][b], TAU_T, TAU_S) for b in range(B)) / B for g in range(G))
    ll = sum(sum(naive_ce(t_search[i][b], s_loc[i][b], TAU_T, TAU_S) for b in range(B)) / B for i in range(L)) / L
    return lg, ll


def naive_grads(s_glob, s_loc, t_glob, t_search, center):
    """Analytic dtotal/ds: each CE term contributes (softmax(s/tau) - p) / tau times its weight."""
    gg = torch.zeros(G, B, D, dtype=torch.float64)
    gl = torch.zeros(L, B, D, dtype=torch.float64)

    def t64(x):
        return torch.tensor(x, dtype=torch.float64)

    for b in range(B):
        for g in range(G):
            q = F.softmax(t64(s_glob[1 - g][b]) / TAU_S, 0)
            p = F.softmax((t64(t_glob[g][b]) - t64(center)) / TAU_T, 0)
            gg[1 - g, b] += 0.5 * 0.5 * (q - p) / (B * TAU_S)  # 1/2 (stage weight) * 1/2 (pair mean)
        for i in range(L):
            q = F.softmax(t64(s_loc[i][b]) / TAU_S, 0)
            p = F.softmax(t64(t_search[i][b]) / TAU_T, 0)
            gl[i, b] += 0.5 * (q - p) / (L * B * TAU_S)
    return gg, gl


def _unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_loss_gradients_and_centers_match_naive_reference_over_steps():
    loss_fn = SCFSShallowLoss(N_STAGES, D, TAU_S, M).double()
    centers = [[0.0] * D for _ in range(N_STAGES)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        s_glob = [_unit(G, B, D, g=g).requires_grad_(True) for _ in range(N_STAGES)]
        s_loc = [_unit(L, B, D, g=g).requires_grad_(True) for _ in range(N_STAGES)]
        t_glob = [_unit(G, B, D, g=g) for _ in range(N_STAGES)]
        t_search = [_unit(L, B, D, g=g) for _ in range(N_STAGES)]
        total, table = loss_fn(s_glob, s_loc, t_glob, t_search, TAU_T)
        total.backward()
        ref_total = 0.0
        for k in range(N_STAGES):
            args = (s_glob[k].tolist(), s_loc[k].tolist(), t_glob[k].tolist(), t_search[k].tolist(), centers[k])
            lg, ll = naive_stage(*args)
            assert table[k, 0].item() == pytest.approx(lg, rel=1e-9)
            assert table[k, 1].item() == pytest.approx(ll, rel=1e-9)
            ref_total += 0.5 * (lg + ll)
            gg, gl = naive_grads(*args)
            torch.testing.assert_close(s_glob[k].grad, gg, rtol=1e-7, atol=1e-12)
            torch.testing.assert_close(s_loc[k].grad, gl, rtol=1e-7, atol=1e-12)
        assert total.item() == pytest.approx(ref_total, rel=1e-9)
        loss_fn.reduce_center_update(t_glob)
        loss_fn.apply_center_update()
        for k in range(N_STAGES):
            tk = t_glob[k].tolist()
            centers[k] = [M * c + (1 - M) * sum(tk[a][b][j] for a in range(G) for b in range(B)) / (G * B)
                          for j, c in enumerate(centers[k])]
        torch.testing.assert_close(loss_fn.center, torch.tensor(centers, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(loss_fn.center[0], loss_fn.center[1])  # one independent center per stage


def test_local_targets_are_not_centred_and_global_targets_are():
    g = torch.Generator().manual_seed(1)
    s_loc, t_search = _unit(L, B, D, g=g), _unit(L, B, D, g=g)
    s_glob, t_glob = _unit(G, B, D, g=g), _unit(G, B, D, g=g)
    shift = torch.randn(D, generator=g, dtype=torch.float64)
    zero = torch.zeros(D, dtype=torch.float64)
    assert shallow_global_loss(s_glob, t_glob, shift, TAU_T, TAU_S) != shallow_global_loss(s_glob, t_glob, zero,
                                                                                          TAU_T, TAU_S)
    loss_fn = SCFSShallowLoss(1, D).double()
    before = loss_fn([s_glob], [s_loc], [t_glob], [t_search], TAU_T)[1]
    loss_fn.center.copy_(shift)
    after = loss_fn([s_glob], [s_loc], [t_glob], [t_search], TAU_T)[1]
    assert after[0, 1] == before[0, 1]  # local term ignores the center
    assert after[0, 0] != before[0, 0]


def test_no_gradient_into_teacher_inputs_and_state_not_touched_by_forward():
    g = torch.Generator().manual_seed(2)
    t_glob = _unit(G, B, D, g=g).requires_grad_(True)
    t_search = _unit(L, B, D, g=g).requires_grad_(True)
    s_glob, s_loc = _unit(G, B, D, g=g).requires_grad_(True), _unit(L, B, D, g=g).requires_grad_(True)
    loss_fn = SCFSShallowLoss(1, D).double()
    loss_fn([s_glob], [s_loc], [t_glob], [t_search], TAU_T)[0].backward()
    assert t_glob.grad is None and t_search.grad is None
    assert s_glob.grad is not None and s_loc.grad is not None
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn.apply_center_update()  # nothing pending: no-op
    assert torch.count_nonzero(loss_fn.center) == 0


def test_local_loss_pairs_each_crop_with_its_own_target():
    g = torch.Generator().manual_seed(4)
    s_loc, t_search = _unit(L, B, D, g=g), _unit(L, B, D, g=g)
    base = shallow_local_loss(s_loc, t_search, TAU_T, TAU_S)
    assert shallow_local_loss(s_loc, t_search.roll(1, dims=0), TAU_T, TAU_S) != base
    with pytest.raises(ValueError, match="same"):
        shallow_local_loss(s_loc, t_search[:, :2], TAU_T, TAU_S)


def test_shape_errors_name_the_argument():
    loss_fn = SCFSShallowLoss(2, D)
    x = torch.rand(G, B, D)
    with pytest.raises(ValueError, match="student_global"):
        loss_fn([x], [x, x], [x, x], [x, x], TAU_T)
    with pytest.raises(ValueError, match="searched_teacher"):
        loss_fn([x, x], [x, x], [x, x], [x, torch.rand(G, B, D + 1)], TAU_T)


def test_bf16_autocast():
    """fp32 inputs under bf16 autocast give the fp32 loss exactly (fp32 island); inputs rounded to bf16 stay within
    0.1% (unit vectors: bf16 rounding <= 2^-9 relative, amplified by 1/T_t in the softmax, averaged over B and D)."""
    g = torch.Generator().manual_seed(5)
    args = ([F.normalize(torch.randn(G, 32, 256, generator=g), dim=-1) for _ in range(N_STAGES)],
            [F.normalize(torch.randn(L, 32, 256, generator=g), dim=-1) for _ in range(N_STAGES)],
            [F.normalize(torch.randn(G, 32, 256, generator=g), dim=-1) for _ in range(N_STAGES)],
            [F.normalize(torch.randn(L, 32, 256, generator=g), dim=-1) for _ in range(N_STAGES)])
    loss_fn = SCFSShallowLoss(N_STAGES, 256)
    loss_fn.center.normal_(0, 0.01)
    ref = loss_fn(*args, 0.04)[0]
    low_args = [[t.bfloat16() for t in group] for group in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same = loss_fn(*args, 0.04)[0]
        low = loss_fn(*low_args, 0.04)[0]
    assert same.dtype == low.dtype == torch.float32
    torch.testing.assert_close(same, ref)
    assert abs(low.item() - ref.item()) <= 1e-3 * ref.item()
