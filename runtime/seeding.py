"""One derivation for every seed in the project: ``derive_seed(stream, *keys)``.

Every random stream that must be reproducible (a resumed run redraws what the interrupted run drew, and two ranks
draw what one process would) seeds its generator from a pure function of integers such as ``(seed, epoch, rank,
step)``. :func:`derive_seed` is that function. It hashes a :class:`Stream` tag and the keys with BLAKE2b, so

* it is platform- and process-independent (no Python ``hash()``, no ``PYTHONHASHSEED``);
* nearby keys give unrelated seeds (``(seed, step)`` and ``(seed, step + 1)`` share no structure), and distinct key
  tuples collide only with probability ~2^-bits;
* two consumers never share a stream: the tag of each consumer is part of the hash, so the crop RNG of epoch 3 is
  not the augmentation RNG of step 3.

The result is a non-negative int below ``2 ** bits``. The default, 63 bits, fits every consumer that takes a signed
or unsigned 64-bit seed (``torch.manual_seed``, ``torch.Generator.manual_seed``, ``random.seed``,
``numpy.random.default_rng``); DALI's pipeline seed asks for ``bits=31`` (a non-negative int32) and FFCV's 64-bit
stream key for ``bits=64``.
"""

from __future__ import annotations

import enum
import hashlib
import operator

_KEY_BYTES = 8  # every key is encoded at a fixed width, so distinct key tuples give distinct byte strings
_PERSON = b"flashssl.seed"


class Stream(enum.IntEnum):
    """The tag of each seeded random stream; one member per consumer, never reused or renumbered."""

    SAMPLE_TRANSFORM = 1  # torchvision loader: per-sample crop and flip draws, keys (seed, epoch, index)
    DEVICE_AUGMENT = 2  # device augmentation: per-step host generator, keys (seed, step)
    DALI_PIPELINE = 3  # DALI loader: one pipeline per (seed, epoch, rank)
    HANDCRAFTED_AUGMENT = 4  # handcrafted representations: batch-shared torchvision draw, keys (seed, step)
    CW_RGP_PARTITION = 5  # CW-RGP loss: random group partitions, keys (seed, step, rank)
    FFCV_CROPS = 6  # FFCV multi-crop decoder: epoch key of the counter-based crop RNG, keys (seed, epoch)
    SHARD_ORDER = 7  # loaders: per-epoch sample permutation, keys (seed, epoch)
    QUASI_ORDER = 8  # FFCV quasi-random order: page permutation and in-window shuffle, keys (seed, epoch)


def derive_seed(stream: Stream, *keys: int, bits: int = 63) -> int:
    """A seed that is a pure, well-mixed function of ``(stream, *keys)``.

    Args:
        stream: which consumer draws from the seed (see :class:`Stream`); distinct streams never coincide.
        keys: non-negative integers below 2^64, e.g. ``(seed, epoch, rank)`` or ``(seed, step)``.
        bits: width of the result, 1..64: 63 for torch / numpy / ``random``, 31 for DALI, 64 for a uint64 key.
    Returns:
        An int in ``[0, 2 ** bits)``.
    Raises:
        ValueError: ``stream`` is not a :class:`Stream`, a key is negative or too large, or ``bits`` is out of range.
        TypeError: a key is not an integer.
    """
    if not isinstance(stream, Stream):
        raise ValueError(f"derive_seed: stream must be a runtime.seeding.Stream member, got {stream!r}")
    if not 1 <= bits <= 64:
        raise ValueError(f"derive_seed: bits must be in 1..64, got {bits}")
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    for key in (int(stream), *keys):
        value = operator.index(key)  # ints, numpy and torch integers; floats fail
        if not 0 <= value < 2 ** (8 * _KEY_BYTES):
            raise ValueError(f"derive_seed: keys must be integers in [0, 2^64), got {key!r}")
        h.update(value.to_bytes(_KEY_BYTES, "little"))
    return int.from_bytes(h.digest(), "little") >> (64 - bits)
