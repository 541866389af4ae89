"""derive_seed: a pure, well-mixed, range-checked function of (stream, keys) that every seeded consumer accepts."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.seeding import Stream, derive_seed

ROOT = Path(__file__).resolve().parents[1]


def test_pure_function_of_its_arguments_across_processes():
    """Same value in a fresh interpreter with a different hash seed: nothing depends on Python's ``hash()``."""
    here = [derive_seed(Stream.DEVICE_AUGMENT, 3, 7), derive_seed(Stream.FFCV_CROPS, 0, 1, bits=64)]
    code = ("from runtime.seeding import Stream, derive_seed; "
            "print(derive_seed(Stream.DEVICE_AUGMENT, 3, 7), derive_seed(Stream.FFCV_CROPS, 0, 1, bits=64))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert [int(v) for v in out.stdout.split()] == here
    assert derive_seed(Stream.DEVICE_AUGMENT, 3, 7) == here[0]


@pytest.mark.parametrize("bits", [1, 31, 63, 64])
def test_range_and_high_bits_are_used(bits):
    seeds = [derive_seed(Stream.SAMPLE_TRANSFORM, 0, 0, i, bits=bits) for i in range(2000)]
    assert all(0 <= s < 2**bits for s in seeds)
    top = [s >> (bits - 1) for s in seeds]  # the most significant bit is a fair coin
    assert 900 < sum(top) < 1100


def test_every_consumer_accepts_the_extremes_of_its_range():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2**63 - 1)
    torch.Generator().manual_seed(2**63 - 1)
    np.random.default_rng(2**63 - 1)
    np.random.default_rng(2**64 - 1)  # a uint64 key
    assert np.uint64(derive_seed(Stream.FFCV_CROPS, 1, 2, bits=64)) == derive_seed(Stream.FFCV_CROPS, 1, 2, bits=64)
    assert derive_seed(Stream.DALI_PIPELINE, 2**32 - 1, 10**6, 63, bits=31) <= np.iinfo(np.int32).max


def test_distinct_across_keys_streams_and_key_order():
    keys = list(itertools.product(range(4), range(30), range(4)))  # (seed, epoch/step, rank)
    seeds = {derive_seed(stream, *k) for stream in Stream for k in keys}
    assert len(seeds) == len(Stream) * len(keys)
    # the arithmetic-combination traps: swapped keys, shifted keys, a key moved between positions, an extra zero
    assert derive_seed(Stream.CW_RGP_PARTITION, 1, 2, 3) != derive_seed(Stream.CW_RGP_PARTITION, 1, 3, 2)
    assert derive_seed(Stream.SHARD_ORDER, 0, 1000) != derive_seed(Stream.SHARD_ORDER, 1, 0)
    assert derive_seed(Stream.DEVICE_AUGMENT, 5) != derive_seed(Stream.DEVICE_AUGMENT, 5, 0)
    assert derive_seed(Stream.DEVICE_AUGMENT) != derive_seed(Stream.HANDCRAFTED_AUGMENT)


def test_nearby_keys_give_unrelated_seeds():
    """Consecutive steps flip about half of the 63 bits (avalanche), not a few low ones."""
    flips = [bin(derive_seed(Stream.DEVICE_AUGMENT, 0, s) ^ derive_seed(Stream.DEVICE_AUGMENT, 0, s + 1)).count("1")
             for s in range(500)]
    assert 29 < np.mean(flips) < 34


def test_integer_like_keys_match_python_ints():
    assert derive_seed(Stream.SHARD_ORDER, np.int64(3), torch.tensor(4)) == derive_seed(Stream.SHARD_ORDER, 3, 4)


@pytest.mark.parametrize("args, kwargs, match", [
    ((Stream.SHARD_ORDER, -1), {}, "keys must be integers in"),
    ((Stream.SHARD_ORDER, 2**64), {}, "keys must be integers in"),
    ((Stream.SHARD_ORDER, 1), {"bits": 0}, "bits must be in 1..64"),
    ((Stream.SHARD_ORDER, 1), {"bits": 65}, "bits must be in 1..64"),
    ((7, 1), {}, "stream must be a runtime.seeding.Stream"),
])
def test_bad_input_is_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        derive_seed(*args, **kwargs)
    with pytest.raises(TypeError):
        derive_seed(Stream.SHARD_ORDER, 1.5)
