"""FFCV pipeline stages for decode-once multi-crop: the multi-crop decoder, an index decoder and the RNG.

:class:`MultiCropDecoder` is an FFCV ``Operation`` for the ``image`` field (``RGBImageField``, jpg or raw). It decodes
each sample's JPEG **once** into a scratch buffer and cuts all V views from it: a torchvision-semantics
RandomResizedCrop box (:data:`pipeline.load.crops.sample_rrc_nb`), OpenCV ``INTER_AREA`` resize (antialiased when
shrinking), then a horizontal flip with the view's ``flip_p``. Stock FFCV decodes again for every view, which is the
dominant cost of a multi-crop recipe (JPEG time is entropy decoding; ``docs/performance.md``).

Output contract (:meth:`MultiCropDecoder.declare_state_and_memory`): one uint8 array ``(B, total_bytes + 1)`` per batch,
laid out **view-major**: ``B * 3 * S_0^2`` bytes of view 0 as (B, S_0, S_0, 3) HWC, then view 1, ...; the last B bytes
are a per-sample status (0 ok, 1 JPEG decode failed). :func:`split_views` turns it into V channels-last tensors
(B, 3, S, S) over the same memory (no copy).

Randomness is counter-based: each (seed, epoch, sample index, view) has its own splitmix64 stream (:class:`CounterRNG`),
so crops do not depend on threads, batches, workers or ranks. The (seed, epoch) key lives in a small host array read
through a raw pointer at every batch, because FFCV freezes closure constants when it compiles.
"""

from __future__ import annotations  # noqa: I001  (pipeline.load.ffcv_compat must precede the ffcv imports)

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from pipeline.load.ffcv_compat import JPG_MODE, imdecode_c, memcpy_c, resize_c  # first: checks ffcv, keeps threads
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit, prange, uint64
from numba.experimental import jitclass

from pipeline.load.crops import sample_rrc_nb
from runtime.seeding import Stream, derive_seed

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_VIEW_STEP = np.uint64(0xD1B54A32D192ED03)


@njit(cache=True)
def mix64(z: np.uint64) -> np.uint64:
    """splitmix64 finaliser: a bijective 64-bit hash with full avalanche (all arithmetic wraps mod 2^64)."""
    z = uint64(z)
    z = (z ^ (z >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> uint64(27))) * uint64(0x94D049BB133111EB)
    return z ^ (z >> uint64(31))


@njit(cache=True)
def view_key(ekey: np.uint64, sample: np.uint64, view: np.uint64) -> np.uint64:
    """Key of the RNG stream of one view of one sample, from the epoch key (:meth:`MultiCropDecoder.set_epoch`)."""
    skey = mix64(uint64(ekey) + uint64(sample) * _GOLDEN)
    return mix64(skey + (uint64(view) + uint64(1)) * _VIEW_STEP)


@jitclass([("key", uint64), ("counter", uint64)])
class CounterRNG:
    """Counter-based generator exposing the two ``numpy.random.Generator`` methods ``sample_rrc_nb`` uses.

    ``next = mix64(key + counter * golden)``; one object per (sample, view), created inside the compiled loop.
    """

    def __init__(self, key):
        self.key = key
        self.counter = 0

    def random(self):
        """Uniform float64 in [0, 1) with 53 random bits."""
        self.counter += uint64(1)
        bits = mix64(self.key + self.counter * _GOLDEN)
        return float(bits >> uint64(11)) * (1.0 / 9007199254740992.0)

    def uniform(self, low, high):
        return low + (high - low) * self.random()

    def integers(self, low, high):
        """Uniform integer in [low, high) (``high`` exclusive, like ``Generator.integers``)."""
        span = high - low
        return low + min(int(self.random() * span), span - 1)


@njit(cache=True, nogil=True)
def hflip_inplace(img: np.ndarray) -> None:
    """Mirror an (H, W, 3) uint8 image left-right in place."""
    h, w = img.shape[0], img.shape[1]
    for r in range(h):
        for c in range(w // 2):
            for ch in range(3):
                tmp = img[r, c, ch]
                img[r, c, ch] = img[r, w - 1 - c, ch]
                img[r, w - 1 - c, ch] = tmp


def view_layout(sizes: Sequence[int]) -> tuple[np.ndarray, int]:
    """Per-sample byte offsets of each view (HWC uint8) and the total bytes of all views of one sample."""
    nbytes = np.array([3 * s * s for s in sizes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    return offsets, int(nbytes.sum())


class MultiCropDecoder(Operation):
    """Decode each JPEG once and cut V random-resized, randomly flipped crops from it (see module docstring).

    Args:
        sizes: (V,) output side of every view, globals first.
        scales: (V, 2) RandomResizedCrop area-fraction range of every view.
        ratios: (V, 2) aspect-ratio (w / h) range of every view, sampled log-uniformly.
        flip_ps: (V,) horizontal-flip probability of every view (0 = leave flipping to the device augmentation).
    """

    def __init__(self, sizes: Sequence[int], scales: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]],
                 flip_ps: Sequence[float]) -> None:
        super().__init__()
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
        self.ratios = np.asarray(ratios, dtype=np.float64).reshape(-1, 2)
        self.flip_ps = np.asarray(flip_ps, dtype=np.float64)
        n = len(self.sizes)
        if not (len(self.scales) == len(self.ratios) == len(self.flip_ps) == n and n > 0):
            raise ValueError(f"MultiCropDecoder: sizes/scales/ratios/flip_ps must have the same length > 0, got "
                             f"{n}, {len(self.scales)}, {len(self.ratios)}, {len(self.flip_ps)}")
        self.offsets, self.total_bytes = view_layout(self.sizes.tolist())
        # Read by the compiled code at every batch through its address; never reallocate this array.
        self.key_block = np.zeros(1, dtype=np.uint64)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Select the random streams of ``epoch`` (call before the epoch's iterator starts decoding)."""
        self.key_block[0] = np.uint64(derive_seed(Stream.FFCV_CROPS, seed, epoch, bits=64))

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        heights, widths = self.metadata["height"], self.metadata["width"]
        if len(heights) == 0:
            raise ValueError("MultiCropDecoder: the dataset has no samples")
        max_pixels = np.uint64(int(heights.max()) * int(widths.max()))
        out_shape = (self.total_bytes + 1,)  # + 1 status byte per sample (see module docstring)
        u8 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=out_shape, dtype=u8),
            (AllocationQuery(out_shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)),
        )

    def generate_code(self) -> Callable:
        """Per-loader glue (serial, compiles in well under a second): look up each sample's bytes, then call the
        process-wide parallel kernel :func:`decode_multicrop` (compiled once per process, whatever the loader)."""
        mem_read = self.memory_read
        kernel = decode_multicrop if Compiler.is_enabled else decode_multicrop.py_func
        memcpy = memcpy_c  # a closure constant of the compiled glue
        sizes, scales, ratios, flip_ps, offsets = self.sizes, self.scales, self.ratios, self.flip_ps, self.offsets
        key_addr = self.key_block.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            count = len(batch_indices)
            addrs, nbytes = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
            modes, heights = np.empty(count, dtype=np.int64), np.empty(count, dtype=np.int64)
            widths = np.empty(count, dtype=np.int64)
            for k in range(count):
                field = metadata[batch_indices[k]]
                data = mem_read(field["data_ptr"], storage_state)
                addrs[k], nbytes[k] = data.ctypes.data, data.size
                modes[k], heights[k], widths[k] = field["mode"], field["height"], field["width"]
            ekey = np.zeros(1, dtype=np.uint64)
            memcpy(key_addr, ekey.ctypes.data, 8)
            kernel(addrs, nbytes, modes, heights, widths, batch_indices, destination, temp_storage,
                   ekey[0], sizes, scales, ratios, flip_ps, offsets)
            return destination

        return decode


@njit(parallel=True, nogil=True)
def decode_multicrop(addrs, nbytes, modes, heights, widths, sample_ids, destination, temp_storage, ekey, sizes,
                     scales, ratios, flip_ps, offsets):
    """Decode B images once each and write all their crops into ``flat`` (view-major, see the module docstring).

    Args:
        addrs, nbytes: (B,) int64 address and size of each sample's stored bytes (JPEG or raw HWC pixels).
        modes, heights, widths: (B,) int64 FFCV image mode (0 = jpg, 1 = raw) and stored size.
        sample_ids: (B,) dataset indices (select the random streams).
        destination: (B, total + 1) uint8 output; temp_storage: (B, max_h * max_w * 3) uint8 decode scratch.
        ekey: uint64 epoch key (:meth:`MultiCropDecoder.set_epoch`).
        sizes, scales, ratios, flip_ps, offsets: per-view recipe and per-sample byte offsets.

    No argument may be a 1-D uint8 array: FFCV's ``OSCacheManager.state_type`` sets ``mutable = False`` on numba's
    interned ``uint8[::1]`` type every time a loader is built, which changes the hash of that type and corrupts the
    overload table of any dispatcher keyed on it (KeyError when the next loader compiles its glue).
    """
    count = len(sample_ids)
    flat = destination.reshape(-1)
    total = 0
    for v in range(len(sizes)):
        total += 3 * sizes[v] * sizes[v]
    for k in prange(count):
        height, width = int(heights[k]), int(widths[k])  # int(): Python ints for ctypes when the JIT is off
        src = int(addrs[k])
        status = 0
        if modes[k] == JPG_MODE:
            temp = temp_storage[k]
            res = imdecode_c(src, int(nbytes[k]), height, width, temp.ctypes.data, height, width, 0, 0, 1, 1,
                             False, False)
            status = 1 if res < 0 else 0
            src = temp.ctypes.data
        flat[count * total + k] = status
        for v in range(len(sizes)):
            rng = CounterRNG(np.uint64(view_key(ekey, np.uint64(sample_ids[k]), np.uint64(v))))  # np.uint64: JIT off
            top, left, ch, cw = sample_rrc_nb(height, width, (scales[v, 0], scales[v, 1]), (ratios[v, 0], ratios[v, 1]),
                                              rng)
            s = sizes[v]
            start = count * offsets[v] + k * 3 * s * s
            out = flat[start: start + 3 * s * s].reshape(s, s, 3)
            resize_c(0, src, height, width, top, top + ch, left, left + cw, out.ctypes.data, int(s), int(s))
            if rng.random() < flip_ps[v]:
                hflip_inplace(out)


def split_views(buffer: np.ndarray, sizes: Sequence[int]) -> tuple[list[torch.Tensor], np.ndarray]:
    """Zero-copy split of a :class:`MultiCropDecoder` output into per-view tensors.

    Args:
        buffer: (B, total_bytes + 1) uint8, view-major as described in the module docstring.
        sizes: (V,) view sides, the decoder's ``sizes``.

    Returns:
        (views, status): V uint8 tensors (B, 3, S_v, S_v) in channels-last memory format sharing ``buffer``'s
        memory, and the (B,) uint8 status array (nonzero = the JPEG of that sample failed to decode).
    """
    count = buffer.shape[0]
    offsets, total = view_layout(sizes)
    flat = torch.from_numpy(buffer.reshape(-1))
    views = []
    for off, s in zip(offsets.tolist(), sizes):
        chunk = flat[count * off: count * (off + 3 * s * s)]
        views.append(chunk.view(count, s, s, 3).permute(0, 3, 1, 2))
    return views, buffer.reshape(-1)[count * total: count * total + count]


class IndexDecoder(Operation):
    """Decoder that ignores the field's data and outputs the dataset index of every sample: (B,) int64."""

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        i64 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(), dtype=i64), AllocationQuery((), i64)

    def generate_code(self) -> Callable:
        def decode(batch_indices, destination, metadata, storage_state):
            for k in range(len(batch_indices)):
                destination[k] = batch_indices[k]
            return destination[: len(batch_indices)]

        return decode
