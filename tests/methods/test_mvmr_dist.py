"""MV-MR on 2 gloo ranks: every rank computes exactly its own single-process loss (per-GPU behaviour).

The official code runs Lightning DDP without SyncBN and without any all_gather: MSE, std and every dCor term are
computed on the per-GPU batch, so it is *not* equivalent to one process on the concatenated batch. What DDP adds is
the gradient average. So: rank r's loss and logs == one process on shard r; DDP's gradients == the mean over r of
those single-process gradients; and the per-rank loss differs from the loss on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import load_config
from methods import StepContext, build_method
from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # kymatio's many tiny ops crawl on spinning threads

B = 4  # per rank
CTX = StepContext(step=5, epoch=0, steps_per_epoch=10, total_steps=100)
OVERRIDES = [
    "model.backbone=test_resnet", "ssl.proj_hidden_dim=32", "ssl.proj_out_dim=24", "model.precision=fp32",
    f"data.batch_size={B}",
    "data.views=[{role: global, size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, "
    "grayscale_p: 0.0}, {role: global, size: 32, scale: [0.2, 1.0]}]",
]


def _views(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)]


def _step(model: nn.Module, method: nn.Module, views: list[torch.Tensor]):
    out = model(views, 2, CTX)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters()}
    return out.loss.detach(), {k: v.detach() for k, v in out.logs.items()}, grads


def _build():
    torch.manual_seed(0)  # identical initial weights in every process
    return build_method(load_config("mvmr", [], OVERRIDES)).train()


def _worker(rank, world_size, tmpdir):
    method = _build()
    ddp = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
    shard = [v[rank * B:(rank + 1) * B] for v in _views(world_size * B)]
    return _step(ddp, method, shard)


@pytest.mark.dist
def test_each_rank_equals_its_own_single_process_step():
    per_rank = run_distributed(_worker, 2)
    views = _views(2 * B)
    single = [_step(m, m, [v[r * B:(r + 1) * B] for v in views]) for r, m in enumerate([_build(), _build()])]
    for (loss, logs, _), (loss1, logs1, _) in zip(per_rank, single):
        torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-6)
        for k in logs1:
            torch.testing.assert_close(logs[k], logs1[k], rtol=1e-6, atol=1e-6)
    for name, g in per_rank[0][2].items():
        mean = (single[0][2][name] + single[1][2][name]) / 2
        torch.testing.assert_close(g, mean, rtol=1e-4, atol=1e-6)  # DDP averages the per-rank gradients
        torch.testing.assert_close(per_rank[1][2][name], g)
    joint_loss = _build()(views, 2, CTX).loss.detach()
    assert not torch.allclose(joint_loss, (single[0][0] + single[1][0]) / 2, rtol=1e-3)  # not global-batch equivalent
    assert not torch.allclose(single[0][0], single[1][0])
