import torch

from runtime import dist
from tests.dist_helpers import run_distributed


def _gather_worker(rank, world_size, tmpdir):
    x = torch.full((2, 3), float(rank), requires_grad=True)
    g = dist.gather_with_grad(x)
    (g * torch.arange(g.shape[0]).float()[:, None]).sum().backward()
    return dist.rank(), dist.world_size(), g.detach(), x.grad


def test_gather_with_grad_two_ranks():
    out = run_distributed(_gather_worker, 2)
    for rank, (r, w, g, grad) in enumerate(out):
        assert (r, w) == (rank, 2)
        assert torch.equal(g, torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        # each rank's loss weights row i by i; summed over the 2 ranks, rank r's rows get 2 * (2r + i)
        expected = 2 * torch.arange(2 * rank, 2 * rank + 2).float()[:, None].expand(2, 3)
        assert torch.equal(grad, expected)


def test_helpers_without_process_group():
    x = torch.ones(3)
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.gather_with_grad(x) is x
    assert dist.all_reduce_sum(x) is None and torch.equal(x, torch.ones(3))
