"""ReSA on 2 gloo ranks == one process on the concatenated batch (spec resa.md §1.3, official HEAD behaviour).

Online embeddings stay local; the momentum embeddings and encodings are all-gathered without gradient; the Sinkhorn
column sums (over online samples) are reduced over ranks. Then the stacked per-rank assignments equal the global
one, the rank-averaged loss equals the global loss, and each rank's gradient on its own rows equals W x the global
gradient (which DDP's average brings back). Also checked through a linear head over several SGD steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losses.resa import ReSALoss
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, V, M, N, D_IN, D, E = 3, 3, 2, 8, 6, 5, 7
LR = 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(STEPS, V, N, D_IN, generator=g, dtype=torch.float64)
    h = torch.randn(STEPS, N, E, generator=g, dtype=torch.float64)
    h_bar = h + 0.5 * torch.randn(STEPS, N, E, generator=g, dtype=torch.float64)
    z_bar = torch.randn(STEPS, M, N, D, generator=g, dtype=torch.float64)
    head = nn.Linear(D_IN, D).double()
    return feats, h, h_bar, z_bar, head.state_dict()


def run_steps(data, rank=0, world=1):
    """A linear online head trained with the ReSA loss on this rank's rows (momentum side: fixed embeddings)."""
    feats, h, h_bar, z_bar, head_state = data
    head = nn.Linear(D_IN, D).double()
    head.load_state_dict(head_state)
    loss_fn = ReSALoss(temperature=0.4, sinkhorn_eps=0.05, sinkhorn_iters=3, gather=True)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    history = []
    for step in range(STEPS):
        head.zero_grad()
        z = head(feats[step][:, rows])
        z.retain_grad()
        loss, a = loss_fn(z, h[step][rows], z_bar[step][:, rows], h_bar[step][rows])
        loss.backward()
        z_grad = z.grad.clone()
        grads = [dist.all_reduce_mean(p.grad.clone()) for p in head.parameters()]  # what DDP does
        with torch.no_grad():
            for p, gr in zip(head.parameters(), grads):
                p -= LR * gr
        history.append((dist.all_reduce_mean(loss.detach().clone()), grads, a, z_grad))
    return history


def _worker(rank, world_size, tmpdir, data):
    return run_steps(data, rank, world_size)


@pytest.mark.dist
def test_two_ranks_equal_one_process_on_concatenated_batch():
    data = _data()
    single = run_steps(data)
    per_rank = run_distributed(_worker, 2, data)
    for step in range(STEPS):
        loss1, grads1, a1, zg1 = single[step]
        torch.testing.assert_close(torch.cat([per_rank[r][step][2] for r in range(2)]), a1, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(torch.cat([per_rank[r][step][3] for r in range(2)], dim=1) / 2, zg1,
                                   rtol=1e-10, atol=1e-14)
        for r in range(2):
            loss, grads, _, _ = per_rank[r][step]
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
            for gr, gr1 in zip(grads, grads1):
                torch.testing.assert_close(gr, gr1, rtol=1e-10, atol=1e-12)
    assert not torch.equal(single[0][0], single[-1][0])
