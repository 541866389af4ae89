"""Two NCCL ranks (one GPU each) == one process on the concatenated batch, for DINO (GPU check).

The same three steps as ``tests/methods/test_dino_dist.py`` (head on fixed float64 embeddings, DDP-style gradient
averaging, the async center all-reduce), on ``cuda:0`` and ``cuda:1`` over NCCL, against the single-process CPU
run. Tolerances: loss and center rel/atol 1e-12, gradients rel 1e-10 (float64; only the reduction order differs).
Skipped with one GPU. In the CPU self-test (FLASHSSL_CHECK_DEVICE=cpu) the same code runs over gloo.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.methods.test_dino_dist import _data, assert_ranks_match_single, run_steps

pytestmark = pytest.mark.cuda


def _worker(rank, world_size, tmpdir, feats, teacher, head_state, dev_type):
    dev = torch.device(dev_type, rank) if dev_type == "cuda" else torch.device("cpu")
    with dev:  # the head and the loss buffers are created on this rank's device
        hist = run_steps(feats.to(dev), teacher.to(dev), head_state, rank, world_size)
    return [(loss.cpu(), [g.cpu() for g in grads], center.cpu()) for loss, grads, center in hist]


def test_two_nccl_ranks_equal_one_process(dev):
    if dev.type == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for NCCL, this machine has {torch.cuda.device_count()}")
    feats, teacher, head_state = _data()
    single = run_steps(feats, teacher, head_state)
    per_rank = run_distributed(_worker, 2, feats, teacher, head_state, dev.type,
                               backend="nccl" if dev.type == "cuda" else "gloo")
    assert_ranks_match_single(per_rank, single)
