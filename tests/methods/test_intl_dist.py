"""INTL on 2 gloo ranks == one process on the concatenated batch (spec intl.md §2.4).

Each rank all-gathers its projector outputs with gradient, whitens the global batch and computes the same loss; the
gather's backward sums gradients over ranks, so each rank's gradient on its own rows is W x the global gradient and
DDP's average of the parameter gradients equals the single-process gradient. Checked through a real DDP-wrapped
linear projector over several SGD steps, for the symmetric and the momentum (EMA-target) variants, with the
trace-loss weight derived from the *global* batch (16 -> 0.01; the per-rank 8 would give 0).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losses.intl import INTLLoss
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, V, N, D_IN, D = 3, 3, 16, 6, 12
LR = 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(STEPS, V, N, D_IN, generator=g, dtype=torch.float64)
    target = torch.randn(STEPS, N, D, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    head = nn.Linear(D_IN, D).double()
    return feats, target, head.state_dict()


def run_steps(data, rank=0, world=1, ema=False, gather=True):
    """A linear projector trained with the INTL loss on this rank's rows (EMA variant: fixed target embeddings)."""
    feats, target, head_state = data
    head = nn.Linear(D_IN, D).double()
    head.load_state_dict(head_state)
    model = nn.parallel.DistributedDataParallel(head) if world > 1 else head
    loss_fn = INTLLoss(iters=4, axis=0, gather=gather)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    history = []
    for step in range(STEPS):
        head.zero_grad()
        z = model(feats[step][:, rows])  # (V, B_l, D)
        z.retain_grad()
        loss, logs = loss_fn(z, target[step][rows]) if ema else loss_fn(z)
        loss.backward()  # DDP averages the parameter gradients over ranks here
        grads = [p.grad.clone() for p in head.parameters()]
        with torch.no_grad():
            for p in head.parameters():
                p -= LR * p.grad
        history.append((loss.detach().clone(), grads, z.grad.clone(), float(logs["trade_off"])))
    return history


CASES = {"symmetric": (False, True), "ema": (True, True), "per_rank": (False, False)}  # (ema, gather)


def _worker(rank, world_size, tmpdir, data):
    assert dist.world_size() == world_size
    return {name: run_steps(data, rank, world_size, ema, gather) for name, (ema, gather) in CASES.items()}


@pytest.fixture(scope="module")
def results():
    """One 2-process spawn for every case (process start-up dominates the cost)."""
    data = _data()
    return data, run_distributed(_worker, 2, data)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["symmetric", "ema"])
def test_two_ranks_equal_one_process_on_concatenated_batch(results, case):
    data, out = results
    single = run_steps(data, ema=CASES[case][0])
    per_rank = [out[r][case] for r in range(2)]
    for step in range(STEPS):
        loss1, grads1, zg1, lam1 = single[step]
        assert lam1 == pytest.approx(0.01)
        # each rank's embedding gradient is W x its slice of the global one
        torch.testing.assert_close(torch.cat([per_rank[r][step][2] for r in range(2)], dim=1) / 2, zg1,
                                   rtol=1e-9, atol=1e-13)
        for r in range(2):
            loss, grads, _, lam = per_rank[r][step]
            assert lam == lam1
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
            for gr, gr1 in zip(grads, grads1):
                torch.testing.assert_close(gr, gr1, rtol=1e-9, atol=1e-12)
    assert not torch.equal(single[0][0], single[-1][0])  # the projector did move


@pytest.mark.dist
def test_per_rank_whitening_is_a_different_method(results):
    """``gather=False`` (an ablation) whitens each half separately: the loss is not the global one."""
    data, out = results
    single = run_steps(data)
    assert out[0]["per_rank"][0][3] == 0.0  # lambda from the local batch of 8
    assert not torch.allclose(out[0]["per_rank"][0][0], single[0][0], rtol=1e-3)
