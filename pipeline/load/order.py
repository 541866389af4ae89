"""[1] The per-epoch sample order and its split over ranks, shared by the torchvision, FFCV and DALI loaders.

Every loader visits a dataset in an order that depends only on ``(seed, epoch)`` and cuts it into whole global
batches of ``batch_size * world_size`` samples (drop_last), so that

* a resumed run restarts at batch ``start`` by slicing the same order (no sampler state);
* every rank gets the same number of batches (no rank waits in a collective for a batch that never comes);
* the global batch of ``world_size`` ranks is the one a single process with ``batch_size * world_size`` would draw,
  rank r taking its rows r, r + world_size, ... (the two-process equivalence tests rely on this).

:func:`shard_indices` is the uniform permutation (``data.order: random``); :func:`quasi_random_order` is a
page-local shuffle for files that do not fit in RAM (``quasi_random``, FFCV only), dealt to ranks batch by batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from runtime.config_loader import ConfigError
from runtime.seeding import Stream, derive_seed


def batches_per_rank(n: int, batch_size: int, world_size: int) -> int:
    """Full batches per rank and epoch (drop_last); ConfigError if not even one global batch fits."""
    batches = n // (batch_size * world_size)
    if batches == 0:
        raise ConfigError(f"data.batch_size: {batch_size} x {world_size} rank(s) is larger than the dataset ({n} "
                          "images); lower data.batch_size")
    return batches


def shard_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's sample order for ``epoch``: (batches_per_rank * batch_size,) int64 dataset indices.

    A (seed, epoch)-seeded permutation of all ``n`` samples, cut to whole global batches and dealt to ranks
    round-robin: rank r takes positions r, r + world_size, ..., so its batch b is rows r::world_size of global
    batch b.
    """
    batches = batches_per_rank(n, batch_size, world_size)
    g = torch.Generator().manual_seed(derive_seed(Stream.SHARD_ORDER, seed, epoch))
    perm = torch.randperm(n, generator=g)[: batches * batch_size * world_size]
    return perm[rank::world_size].numpy().astype(np.int64)


def quasi_random_order(sample_page: np.ndarray, seed: int, epoch: int, batch_size: int, rank: int,
                       world_size: int, batches: int) -> np.ndarray:
    """Page-local shuffle: random page order, samples shuffled within windows of pages, batches dealt to ranks.

    A window spans enough pages for >= 8 global batches, which keeps class mixing per batch close to a full
    shuffle on class-sorted files while reading the file in large sequential-ish chunks.

    Args:
        sample_page: (n,) int64 the first file page holding each sample.
        batches: batches per rank (:func:`batches_per_rank`).
    Returns:
        (batches * batch_size,) int64 dataset indices of this rank, which takes batches r, r + world_size, ... of
        the shuffled order.
    """
    rng = np.random.default_rng(derive_seed(Stream.QUASI_ORDER, seed, epoch))
    pages, inverse = np.unique(sample_page, return_inverse=True)
    page_rank = rng.permutation(len(pages))[inverse]  # position of each sample's page in the random page order
    per_page = len(sample_page) / len(pages)
    window = max(1, math.ceil(8 * batch_size * world_size / per_page))
    # sort by (window of the page, random key): pages of one window are mixed together
    order = np.lexsort((rng.random(len(sample_page)), page_rank // window))
    glob = order[: batches * batch_size * world_size].reshape(batches * world_size, batch_size)
    return glob[rank::world_size].reshape(-1)
