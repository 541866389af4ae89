"""ReSSL on 2 gloo ranks == one process on the concatenated batch (spec ressl.md §1.2-1.3).

The official loss is a per-rank mean over local rows against the shared queue; the teacher keys are all-gathered
without gradient and enqueued, so every rank holds the same queue. Hence the rank-averaged loss, the DDP-averaged
gradients and the queue (contents and pointer) after every step equal the single-process values. Tested on a linear
"student head" over fixed features; a second test runs the real method (shuffle-BN teacher + ``update_state``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.ressl import ReSSLLoss
from models.shuffle_bn import shuffled_forward
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, S, N, D_IN, D, K = 3, 2, 6, 5, 4, 12  # K = 2 * N: the queue wraps around in the third step
LR = 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(STEPS, S, N, D_IN, generator=g, dtype=torch.float64)
    keys = F.normalize(torch.randn(STEPS, N, D, generator=g, dtype=torch.float64), dim=-1)
    head = nn.Linear(D_IN, D).double()
    return feats, keys, head.state_dict()


def run_steps(feats, keys, head_state, rank=0, world=1):
    head = nn.Linear(D_IN, D).double()
    head.load_state_dict(head_state)
    loss_fn = ReSSLLoss(D, K, student_temp=0.1, teacher_temp=0.04).double()
    rows = slice(rank * N // world, (rank + 1) * N // world)
    history = []
    for step in range(STEPS):
        head.zero_grad()
        loss = loss_fn(F.normalize(head(feats[step][:, rows]), dim=-1), keys[step][rows])
        loss.backward()
        grads = [dist.all_reduce_mean(p.grad.clone()) for p in head.parameters()]  # what DDP does
        with torch.no_grad():
            for p, gr in zip(head.parameters(), grads):
                p -= LR * gr
        loss_fn.enqueue(dist.gather_no_grad(keys[step][rows]))  # = ReSSL.update_state
        history.append((dist.all_reduce_mean(loss.detach().clone()), grads, loss_fn.queue.clone(),
                        int(loss_fn.queue_ptr)))
    return history


def _worker(rank, world_size, tmpdir, feats, keys, head_state):
    return run_steps(feats, keys, head_state, rank, world_size)


@pytest.mark.dist
def test_two_ranks_equal_one_process_on_concatenated_batch():
    feats, keys, head_state = _data()
    single = run_steps(feats, keys, head_state)
    for hist in run_distributed(_worker, 2, feats, keys, head_state):
        for (loss, grads, queue, ptr), (loss1, grads1, queue1, ptr1) in zip(hist, single):
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
            for gr, gr1 in zip(grads, grads1):
                torch.testing.assert_close(gr, gr1, rtol=1e-10, atol=1e-12)
            assert torch.equal(queue, queue1) and ptr == ptr1
    assert single[-1][3] == (STEPS * N) % K
    assert not torch.equal(single[0][0], single[-1][0])


def _shuffle_worker(rank, world_size, tmpdir, x_all):
    b = x_all.shape[0] // world_size
    x = x_all[rank * b:(rank + 1) * b]
    per_sample = shuffled_forward(lambda t: 3 * t + 1, x)
    batch_dep = shuffled_forward(lambda t: t - t.mean(dim=0, keepdim=True), x)  # BN-like: depends on the shard
    return per_sample, x, batch_dep


@pytest.mark.dist
def test_shuffle_bn_returns_own_rows_computed_in_random_shards():
    torch.manual_seed(3)
    x_all = torch.randn(16, 3, dtype=torch.float64)
    out = run_distributed(_shuffle_worker, 2, x_all)
    for per_sample, x, _ in out:
        torch.testing.assert_close(per_sample, 3 * x + 1)  # rows come back in the caller's order
    # every output row is x_i - mean(shard of x_i); the shard means recovered from the rows partition the batch
    offsets = torch.cat([x - bd for _, x, bd in out])  # (16, 3): the mean of the shard each sample was put in
    shard_means = torch.unique(offsets.round(decimals=9), dim=0)
    assert shard_means.shape[0] == 2
    for m in shard_means:
        members = (offsets.round(decimals=9) == m).all(dim=1)
        assert int(members.sum()) == 8
        torch.testing.assert_close(x_all[members].mean(dim=0), m, rtol=0, atol=1e-8)
    first_half = torch.zeros(16, dtype=torch.bool)
    first_half[:8] = True
    # the shards are a random partition, not the ranks' own halves (chance of that: 2 / C(16, 8) = 1.6e-4)
    assert not any(((offsets.round(decimals=9) == m).all(dim=1) == first_half).all() for m in shard_means)


def _method_worker(rank, world_size, tmpdir, views_all):
    from engine.config import load_config
    from methods import StepContext, build_method

    torch.manual_seed(100 + rank)  # different init per rank: the queue must still agree (seeded init)
    cfg = load_config("ressl", [], ["model.backbone=resnet18", "ssl.queue_size=16", "ssl.proj_hidden_dim=16",
                                    "ssl.out_dim=8", "data.batch_size=4",
                                    "data.views=[{role: global, count: 2, size: 32}]"])
    method = build_method(cfg).train()
    queue0 = method.loss.queue.clone()
    b = 4
    views = [v[rank * b:(rank + 1) * b] for v in views_all]
    ctx = StepContext(0, 0, 1, 1)
    out = method(views, 2, ctx)
    out.loss.backward()
    method.update_state(out, ctx)
    return queue0, out.state["keys"], method.loss.queue.clone(), int(method.loss.queue_ptr), float(out.loss)


@pytest.mark.dist
@pytest.mark.slow
def test_method_update_state_keeps_identical_queues():
    torch.manual_seed(0)
    views_all = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    (q0a, ka, qa, pa, la), (q0b, kb, qb, pb, lb) = run_distributed(_method_worker, 2, views_all)
    assert torch.equal(q0a, q0b)
    assert torch.equal(qa, qb) and pa == pb == 8
    torch.testing.assert_close(qa[:8], torch.cat([ka, kb]))  # rank order, at the pointer
    assert torch.equal(qa[8:], q0a[8:])
    torch.testing.assert_close(ka.norm(dim=1), torch.ones(4))
    assert torch.isfinite(torch.tensor([la, lb])).all()
