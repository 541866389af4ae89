"""CW-RGP is per GPU (spec cw_rgp.md §3.4): nothing is gathered, each rank whitens its own batch.

On 2 gloo ranks with a real DDP-wrapped linear head over several SGD steps: every rank's loss equals the
single-process loss on its own rows with that rank's partitions (drawn from (seed, step, rank)), and the DDP
gradient equals the mean of the two per-rank single-process gradients. It is *not* the loss of one process on the
concatenated batch (documented behaviour, not a bug), and the two ranks draw different random partitions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from losses.cw_rgp import CWRGPLoss, partition_generator
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, V, N, D_IN, D, W_SIZE, GROUPS, SEED = 3, 4, 16, 10, 16, 4, 2, 11
LR = 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(STEPS, V, N, D_IN, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return feats, nn.Linear(D_IN, D).double().state_dict()


def _rank_loss(head, feats, step, rank, world):
    rows = slice(rank * N // world, (rank + 1) * N // world)
    z = head(feats[step][:, rows])
    loss_fn = CWRGPLoss(groups=GROUPS, w_size=W_SIZE)
    perms = loss_fn.draw(z, partition_generator(SEED, step, rank, z.device))
    return loss_fn(z, *perms)[0], perms


def _worker(rank, world_size, tmpdir, data):
    feats, state = data
    head = nn.Linear(D_IN, D).double()
    head.load_state_dict(state)
    model = nn.parallel.DistributedDataParallel(head)
    history = []
    for step in range(STEPS):
        head.zero_grad()
        loss, perms = _rank_loss(model, feats, step, dist.rank(), world_size)
        loss.backward()  # DDP: mean of the per-rank gradients
        grads = [p.grad.clone() for p in head.parameters()]
        with torch.no_grad():
            for p in head.parameters():
                p -= LR * p.grad
        history.append((loss.detach(), grads, perms))
    return history


def reference(data):
    """One process plays both ranks: per-rank losses on own rows, gradients averaged as DDP does."""
    feats, state = data
    head = nn.Linear(D_IN, D).double()
    head.load_state_dict(state)
    history = []
    for step in range(STEPS):
        losses, grads = [], []
        for r in range(2):
            loss, _ = _rank_loss(head, feats, step, r, 2)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, list(head.parameters())))
        mean = [(a + b) / 2 for a, b in zip(*grads)]
        concat, _ = _rank_loss(head, feats, step, 0, 1)  # one process whitening the concatenated batch
        with torch.no_grad():
            for p, gr in zip(head.parameters(), mean):
                p -= LR * gr
        history.append((losses, mean, concat.detach()))
    return history


@pytest.mark.dist
def test_each_rank_is_its_own_single_process_computation():
    data = _data()
    ref = reference(data)
    out = run_distributed(_worker, 2, data)
    for step in range(STEPS):
        losses, mean_grads, concat = ref[step]
        for r in range(2):
            loss, grads, _ = out[r][step]
            torch.testing.assert_close(loss, losses[r], rtol=1e-10, atol=1e-12)
            for gr, gr1 in zip(grads, mean_grads):
                torch.testing.assert_close(gr, gr1, rtol=1e-9, atol=1e-12)
        # per-GPU whitening is not whitening of the concatenated batch
        assert not torch.allclose((losses[0] + losses[1]) / 2, concat, rtol=1e-4)
        # ranks draw different sample partitions and channel permutations
        p0, p1 = out[0][step][2], out[1][step][2]
        assert not torch.equal(p0[1], p1[1])
    assert not torch.equal(out[0][0][0], out[0][-1][0])
