"""The shared per-epoch order: ranks split exactly the single-process global batches; quasi-random is page-local."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.load.order import batches_per_rank, quasi_random_order, shard_indices
from pipeline.load.torchvision_loader import EpochSampler
from runtime.config_loader import ConfigError


@pytest.mark.parametrize("n, batch_size, world", [(50, 4, 2), (50, 3, 4), (17, 5, 1)])
def test_ranks_split_the_single_process_global_batches(n, batch_size, world):
    """Rank r's batch b is rows r::world of batch b of one process reading batch_size * world samples."""
    single = shard_indices(n, batch_size * world, 7, 3, 0, 1).reshape(-1, batch_size * world)
    ranks = [shard_indices(n, batch_size, 7, 3, r, world).reshape(-1, batch_size) for r in range(world)]
    assert all(len(r) == batches_per_rank(n, batch_size, world) == len(single) for r in ranks)
    for r in range(world):
        assert np.array_equal(ranks[r], single[:, r::world])
    everything = np.concatenate(ranks).ravel()
    assert len(set(everything.tolist())) == len(everything) and everything.max() < n  # no sample twice


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = shard_indices(100, 8, 1, 2, 0, 2)
    assert np.array_equal(a, shard_indices(100, 8, 1, 2, 0, 2))
    assert not np.array_equal(a, shard_indices(100, 8, 1, 3, 0, 2))
    assert not np.array_equal(a, shard_indices(100, 8, 2, 2, 0, 2))
    # seed * 1000 + epoch style mixing would make these coincide
    assert not np.array_equal(shard_indices(100, 8, 0, 1000, 0, 1), shard_indices(100, 8, 1, 0, 0, 1))


def test_torchvision_sampler_uses_the_shared_order_and_resumes_at_start():
    sampler = EpochSampler(50, 4, 7, 1, 2)
    assert sampler.indices(3) == shard_indices(50, 4, 7, 3, 1, 2).tolist()
    sampler.set_epoch(3, start=2)
    assert [i for i, _ in sampler] == sampler.indices(3)[2 * 4:] and len(sampler) == (6 - 2) * 4


def test_too_large_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="data.batch_size: 8 x 2 rank"):
        shard_indices(15, 8, 0, 0, 0, 2)
    with pytest.raises(ConfigError, match="data.batch_size"):
        EpochSampler(15, 8, 0, 0, 2)


def test_quasi_random_order_is_page_local_and_sharded():
    pages = np.repeat(np.arange(40), 25)  # 1000 samples on 40 pages
    orders = [quasi_random_order(pages, seed=0, epoch=2, batch_size=10, rank=r, world_size=2, batches=50)
              for r in range(2)]
    assert len(orders[0]) == len(orders[1]) == 500
    assert not set(orders[0]) & set(orders[1]) and len(set(orders[0]) | set(orders[1])) == 1000
    # window = ceil(8 * 10 * 2 / 25) = 7 pages: a global batch never mixes more than 2 windows of pages
    assert max(len(set(pages[orders[0][i:i + 10]])) for i in range(0, 500, 10)) <= 14
    again = quasi_random_order(pages, seed=0, epoch=2, batch_size=10, rank=0, world_size=2, batches=50)
    assert np.array_equal(orders[0], again)
    assert not np.array_equal(orders[0], quasi_random_order(pages, 0, 3, 10, 0, 2, 50))
