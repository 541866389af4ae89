"""SCFS on 2 gloo ranks == one process on the concatenated batch (spec scfs.md §2.4 "Distributed behaviour").

No logits or features are gathered: the DINO loss and the shallow losses are per-rank means, the feature search is
per image (teacher map of the same image's global crop 1), and only the DINO center and the per-stage shallow centers
are all-reduced. With equal per-rank batches the loss averaged over ranks, both centers and the DDP-averaged
gradients equal the single-process values. Heads here are BN-free stand-ins (pool + linear + normalise) on fixed
stage maps: BN statistics would need SyncBN, which gloo on CPU lacks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses.dino import DINOLoss
from losses.scfs import SCFSShallowLoss
from models.feature_search import pooled_query, searched_targets
from runtime import dist
from tests.dist_helpers import run_distributed

STEPS, G, L, N, C, H, D, K = 2, 2, 3, 4, 6, 4, 5, 7
TAU_T, LR = 0.05, 0.5


class PoolHead(nn.Module):
    """Stand-in shallow head without BN: mean over (h, w) -> linear -> L2 normalise. (M, C, h, w) -> (M, D)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(C, D).double()

    def forward(self, x):
        return F.normalize(self.fc(x.mean(dim=(-2, -1))), dim=-1)


def _data():
    g = torch.Generator().manual_seed(0)
    relu_maps = lambda *s: torch.relu(torch.randn(*s, generator=g, dtype=torch.float64))  # noqa: E731
    batch = {
        "s_glob": relu_maps(STEPS, G, N, C, H, H), "s_loc": relu_maps(STEPS, L, N, C, 2, 2),
        "t_glob": relu_maps(STEPS, G, N, C, H, H),
        "s_logit_in": torch.randn(STEPS, G + L, N, C, generator=g, dtype=torch.float64),
        "t_logits": torch.rand(STEPS, G, N, K, generator=g, dtype=torch.float64) * 2 - 1,
    }
    torch.manual_seed(1)
    student, teacher, proto = PoolHead(), PoolHead(), nn.Linear(C, K).double()
    return batch, student.state_dict(), teacher.state_dict(), proto.state_dict()


def run_steps(batch, s_state, t_state, p_state, rank=0, world=1):
    student, teacher, proto = PoolHead(), PoolHead(), nn.Linear(C, K).double()
    for module, state in ((student, s_state), (teacher, t_state), (proto, p_state)):
        module.load_state_dict(state)
    dino, shallow = DINOLoss(K).double(), SCFSShallowLoss(1, D).double()
    params = list(student.parameters()) + list(proto.parameters())
    rows = slice(rank * N // world, (rank + 1) * N // world)
    history = []
    for step in range(STEPS):
        b = {k: v[step][:, rows] for k, v in batch.items()}
        s_glob = student(b["s_glob"].flatten(0, 1)).unflatten(0, (G, -1))
        s_loc = student(b["s_loc"].flatten(0, 1)).unflatten(0, (L, -1))
        with torch.no_grad():
            t_glob = teacher(b["t_glob"].flatten(0, 1)).unflatten(0, (G, -1))
            query = pooled_query(b["s_loc"].flatten(0, 1)).unflatten(0, (L, -1))
            t_search = searched_targets([teacher], [query], [b["t_glob"][0]])  # global crop 1 only
        loss = dino(proto(b["s_logit_in"]), b["t_logits"], TAU_T)
        loss = loss + shallow([s_glob], [s_loc], [t_glob], t_search, TAU_T)[0]
        for p in params:
            p.grad = None
        loss.backward()
        dino.reduce_center_update(b["t_logits"])
        shallow.reduce_center_update([t_glob])
        grads = [dist.all_reduce_mean(p.grad.clone()) for p in params]  # DDP averaging
        with torch.no_grad():
            for p, gr in zip(params, grads):
                p -= LR * gr
        dino.apply_center_update()
        shallow.apply_center_update()
        history.append((dist.all_reduce_mean(loss.detach().clone()), grads, dino.center.clone(),
                        shallow.center.clone()))
    return history


def _worker(rank, world_size, tmpdir, *args):
    return run_steps(*args, rank, world_size)


@pytest.mark.dist
def test_two_ranks_equal_one_process_on_concatenated_batch():
    args = _data()
    single = run_steps(*args)
    per_rank = run_distributed(_worker, 2, *args)
    for hist in per_rank:
        for (loss, grads, c_dino, c_sh), (loss1, grads1, c_dino1, c_sh1) in zip(hist, single):
            torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c_dino, c_dino1, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c_sh, c_sh1, rtol=1e-12, atol=1e-12)
            for gr, gr1 in zip(grads, grads1):
                torch.testing.assert_close(gr, gr1, rtol=1e-10, atol=1e-12)
    assert single[-1][3].abs().sum() > 0
