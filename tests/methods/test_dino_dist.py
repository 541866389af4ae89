"""DINO on 2 gloo ranks == one process on the concatenated batch.

The official DINO loss is a per-rank mean (no all_gather of logits); only the center is all-reduced (sum, then
divided by the global count). So: the loss averaged over ranks, the center after each update, and the parameter
gradients after DDP's averaging all equal the single-process values on the concatenated batch. Tested at the head
level on fixed embeddings (backbone BN would need SyncBN, which gloo/CPU lacks).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losses.dino import DINOLoss
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, S, T, N, D, K = 3, 4, 2, 6, 5, 9
TAU_T, LR = 0.04, 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(STEPS, S, N, D, generator=g, dtype=torch.float64)
    teacher = torch.rand(STEPS, T, N, K, generator=g, dtype=torch.float64) * 2 - 1
    head = nn.Linear(D, K).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(K, D, generator=g))
        head.bias.copy_(torch.randn(K, generator=g))
    return feats, teacher, head.state_dict()


def run_steps(feats, teacher, head_state, rank=0, world=1, centering="center"):
    """STEPS training steps of a linear 'student head' with the DINO loss on this rank's slice of the batch."""
    head = nn.Linear(D, K).double()
    head.load_state_dict(head_state)
    loss_fn = DINOLoss(K, centering=centering).double()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    history = []
    for step in range(STEPS):
        x, t = feats[step][:, rows], teacher[step][:, rows]
        head.zero_grad()
        loss = loss_fn(head(x), t, TAU_T)
        loss.backward()
        loss_fn.reduce_center_update(t)  # async all-reduce in flight during the "optimizer step"
        grads = [dist.all_reduce_mean(p.grad.clone()) for p in head.parameters()]  # what DDP does
        with torch.no_grad():
            for p, gr in zip(head.parameters(), grads):
                p -= LR * gr
        loss_fn.apply_center_update()
        history.append((dist.all_reduce_mean(loss.detach().clone()), grads, loss_fn.center.clone()))
    return history


def assert_ranks_match_single(per_rank, single) -> None:
    """Every rank's (loss, grads, center) history equals the one-process history on the concatenated batch."""
    for hist in per_rank:
        for (loss, grads, center), (loss1, grads1, center1) in zip(hist, single):
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(center, center1, rtol=1e-12, atol=1e-12)
            for gr, gr1 in zip(grads, grads1):
                torch.testing.assert_close(gr, gr1, rtol=1e-10, atol=1e-12)
    assert not torch.equal(single[0][0], single[-1][0])  # the steps really differ


def _worker(rank, world_size, tmpdir, feats, teacher, head_state, centering):
    return run_steps(feats, teacher, head_state, rank, world_size, centering)


@pytest.mark.dist
@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_two_ranks_equal_one_process_on_concatenated_batch(centering):
    """Sinkhorn centering balances over the global batch: its row sums are all-reduced, so it is equivalent too."""
    feats, teacher, head_state = _data()
    single = run_steps(feats, teacher, head_state, centering=centering)
    per_rank = run_distributed(_worker, 2, feats, teacher, head_state, centering)
    assert_ranks_match_single(per_rank, single)
