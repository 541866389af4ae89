"""[1] FFCV multi-crop loader: ``.beton`` -> decode once per image -> all V crops (+ flip) -> :class:`Batch`.

Loader interface (shared by the torchvision, FFCV and DALI loaders)::

    loader = build_ffcv_loader(data_cfg, seed=seed, rank=rank, world_size=world_size, device=device)
    len(loader)                        # batches per epoch for this rank (drop_last: only full batches)
    for batch in loader.epoch_iter(epoch, start=0):
        batch.views                    # V uint8 (B, 3, S_v, S_v), globals first, order of data_cfg.expanded_views()
        batch.labels, batch.indices    # (B,) int64; colour ops are applied later, by DeviceAugment on the device

Pipeline (:func:`build_ffcv_loader`): ``image`` -> :class:`MultiCropDecoder` (B, sum_v 3 S_v^2 + 1) uint8 view-major
-> ``split_views``; ``label`` -> ``IntDecoder`` (B, 1); ``index`` -> ``IndexDecoder`` (B,). Order and crops depend only
on (seed, epoch, index), so ``epoch_iter(epoch, start)`` resumes exactly at batch ``start``; ``random`` order is the
same permutation and rank split as the torchvision loader, ``quasi_random`` shuffles pages (for data that does not
fit in RAM) and, unlike stock FFCV, works with several ranks. Sharding takes ``rank``/``world_size`` as arguments
(never ``torch.distributed``). ``data_cfg.workers`` numba threads decode; FFCV sets torch's process-wide intra-op
thread count to ``workers`` when an epoch starts. The view tensors alias FFCV's ring buffer and stay valid until the
next batch is requested (``clone()`` what you keep); on CUDA they are copied non-blocking from pinned memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numba
import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.config import DataConfig
from pipeline.load.order import batches_per_rank, quasi_random_order, shard_indices
from runtime.config_loader import ConfigError

_JOIN_TIMEOUT_S = 60.0


def check_beton(path: str) -> None:
    """Raise ConfigError unless ``path`` is a readable ``.beton`` with ``image`` (RGBImageField) and ``label``."""
    import pipeline.load.ffcv_compat  # noqa: F401, I001  (first: checks ffcv's version, keeps torch's threads)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    if not os.path.isfile(path):
        raise ConfigError(f"data.train_path: {path!r} does not exist or is not a file (the ffcv loader reads a .beton "
                          "written by convert_dataset.py --format ffcv)")
    try:
        reader = Reader(path)
    except Exception as e:  # numpy/assert errors from a truncated or foreign file
        msg = f"data.train_path: {path!r} is not a readable FFCV .beton file ({type(e).__name__}: {e})"
        raise ConfigError(msg) from None
    fields = reader.handlers
    if not isinstance(fields.get("image"), RGBImageField) or not isinstance(fields.get("label"), IntField):
        found = {k: type(v).__name__ for k, v in fields.items()}
        raise ConfigError(f"data.train_path: {path!r} must have fields image=RGBImageField and label=IntField, "
                          f"found {found}")
    if reader.num_samples == 0:
        raise ConfigError(f"data.train_path: {path!r} contains no samples")
    bad = corrupt_jpeg_samples(reader)
    if len(bad):
        raise ConfigError(corrupt_message(path, len(bad), reader.num_samples, bad[:5].tolist()))


def corrupt_message(path: str, n_bad: int, n: int | None, examples: list[int]) -> str:
    """One line: which file, how many samples are damaged, and the fix."""
    of = f" of {n}" if n is not None else ""
    return (f"data.train_path: {path}: {n_bad}{of} stored image(s) are corrupt (e.g. sample indices "
            f"{', '.join(map(str, examples))}); the file was damaged after conversion: re-convert it with "
            "convert_dataset.py --overwrite")


def corrupt_jpeg_samples(reader) -> np.ndarray:
    """(n_bad,) int64 indices of samples whose stored JPEG lies past the end of the file or does not start with the
    JPEG start-of-image marker FF D8 FF (e.g. a zeroed region); raw-pixel samples are not checked.

    Reads 3 bytes per sample through a memory map, so it costs one page read per sample (not a decode); damage
    strictly inside one image's entropy-coded data is caught later by the loader's decode status."""
    from pipeline.load.ffcv_compat import field_metadata

    meta = field_metadata(reader, "image")
    jpg = np.flatnonzero(meta["mode"] == 0)  # RGBImageField: mode 0 = JPEG, 1 = raw pixels
    ptr = meta["data_ptr"][jpg].astype(np.int64)
    alloc = reader.alloc_table
    order = np.argsort(alloc["ptr"], kind="stable")
    starts = alloc["ptr"][order].astype(np.int64)
    pos = np.clip(np.searchsorted(starts, ptr), 0, max(len(starts) - 1, 0))
    size = alloc["size"][order][pos].astype(np.int64) if len(starts) else np.zeros_like(ptr)
    data = np.memmap(reader.file_name, dtype=np.uint8, mode="r")
    ok = (starts[pos] == ptr) & (size >= 3) & (ptr + size <= len(data)) if len(starts) else np.zeros(0, bool)
    head = np.zeros((len(ptr), 3), dtype=np.uint8)
    head[ok] = data[ptr[ok, None] + np.arange(3)]
    ok &= (head == np.array([0xFF, 0xD8, 0xFF], dtype=np.uint8)).all(axis=1)
    return jpg[~ok].astype(np.int64)


class _ShardedOrder:
    """This rank's order over the loader's samples (:mod:`pipeline.load.order`), resumable at batch ``start``."""

    def __init__(self, seed: int, batch_size: int, rank: int, world_size: int, quasi: bool):
        self.seed, self.batch_size, self.rank, self.world_size, self.quasi = seed, batch_size, rank, world_size, quasi
        self.start, self.batches, self.n = 0, 0, 0
        self.sample_page: np.ndarray | None = None

    def bind(self, loader, indices: np.ndarray) -> None:
        """Called by FFCV when the Loader is built, with the (n,) sample ids it reads."""
        from pipeline.load.ffcv_compat import first_page_of_samples

        self.n = len(indices)
        self.batches = batches_per_rank(self.n, self.batch_size, self.world_size)
        self.sample_page = first_page_of_samples(loader, self.n) if self.quasi else None

    def sample_order(self, epoch: int) -> np.ndarray:
        """(len(self) - start) * batch_size positions into the loader's sample ids."""
        if self.quasi:
            order = quasi_random_order(self.sample_page, self.seed, epoch, self.batch_size, self.rank,
                                       self.world_size, self.batches)
        else:
            order = shard_indices(self.n, self.batch_size, self.seed, epoch, self.rank, self.world_size)
        return order[self.start * self.batch_size:]


class FFCVLoader:
    """Multi-crop batches from a ``.beton``; see the module docstring. Build with :func:`build_ffcv_loader`."""

    def __init__(self, path: str, data_cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 device: torch.device, flip: bool = True, batches_ahead: int = 3,
                 indices: Sequence[int] | None = None) -> None:
        from pipeline.load import ffcv_compat  # noqa: I001  (first: checks ffcv's version, keeps torch's threads)
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec

        from pipeline.load.ffcv_decode import IndexDecoder, MultiCropDecoder

        if not 0 <= rank < world_size:
            raise ValueError(f"FFCVLoader: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        check_beton(path)
        views = data_cfg.expanded_views()
        self.path, self.seed, self.device, self.n_global = path, seed, device, data_cfg.n_global
        self.sizes = [v.size for v in views]
        self.decoder = MultiCropDecoder(self.sizes, [v.scale for v in views], [v.ratio for v in views],
                                        [v.flip_p if flip else 0.0 for v in views])
        self.order = _ShardedOrder(seed, data_cfg.batch_size, rank, world_size, data_cfg.order == "quasi_random")
        threads = min(max(1, data_cfg.workers), numba.config.NUMBA_NUM_THREADS)
        with ffcv_compat.torch_threads_kept():
            self.loader = Loader(
                path, batch_size=data_cfg.batch_size, num_workers=threads, os_cache=data_cfg.os_cache,
                order=ffcv_compat.traversal_order(self.order.bind, self.order.sample_order), distributed=False,
                seed=seed, drop_last=True, batches_ahead=batches_ahead,
                indices=None if indices is None else np.asarray(indices, dtype=np.int64),
                pipelines={"image": PipelineSpec("image", decoder=self.decoder),
                           "label": PipelineSpec("label", decoder=IntDecoder()),
                           "index": PipelineSpec("label", decoder=IndexDecoder())},
            )
        self._active = None
        # the batch buffers of all crops (~0.7 MB per image for DINO) are allocated once, not every epoch: safe
        # because an epoch's iterator is always stopped before the next one starts (see :meth:`epoch_iter`)
        ffcv_compat.reuse_batch_buffers(self.loader)

    def __len__(self) -> int:
        return self.order.batches

    def close(self) -> None:
        """Stop the background thread of an unfinished epoch (called automatically by the next ``epoch_iter``)."""
        from pipeline.load.ffcv_compat import stop_epoch

        it, self._active = self._active, None
        if it is not None:
            stop_epoch(it, _JOIN_TIMEOUT_S)

    def epoch_iter(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start+1, ..., len(self)-1`` of ``epoch`` for this rank (decoding starts immediately)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"epoch_iter: start must be in [0, {len(self)}], got {start}")
        self.close()  # an unfinished previous epoch must not decode with the new epoch's key
        from pipeline.load.ffcv_compat import start_epoch

        self.order.start = start
        self.decoder.set_epoch(self.seed, epoch)
        self._active = start_epoch(self.loader, epoch)
        return self._batches(self._active)

    def _batches(self, it) -> Iterator[Batch]:
        from pipeline.load.ffcv_compat import next_batch

        while (result := next_batch(it)) is not None:
            images, labels, indices = result
            views, status = split_views_checked(images, self.sizes, indices, self.path)
            # labels/indices are copied (a few bytes); the views alias FFCV's ring buffer (see module docstring)
            batch = Batch(views=views, labels=torch.from_numpy(labels.reshape(-1).copy()),
                          indices=torch.from_numpy(indices.reshape(-1).copy()), n_global=self.n_global)
            yield batch.to(self.device) if self.device.type != "cpu" else batch


def split_views_checked(images: np.ndarray, sizes: list[int], indices: np.ndarray, path: str):
    """:func:`split_views` plus a clear error when a JPEG of the batch could not be decoded."""
    from pipeline.load.ffcv_decode import split_views

    views, status = split_views(images, sizes)
    if status.any():
        bad = indices.reshape(-1)[status != 0].tolist()
        raise ConfigError(corrupt_message(path, len(bad), None, bad[:5]).replace(" stored image(s)",
                                                                              " image(s) of this batch"))
    return views, status


def build_ffcv_loader(data_cfg: DataConfig, *, seed: int, rank: int, world_size: int, device: torch.device,
                      flip: bool = True, batches_ahead: int = 3, indices: Sequence[int] | None = None) -> FFCVLoader:
    """Build the FFCV multi-crop loader for ``data_cfg.train_path`` (a ``.beton``); see the module docstring.

    Args:
        data_cfg: data section of the config (path, batch size, workers, views, os_cache, order).
        seed: base seed; order and crops are a function of (seed, epoch, index).
        rank: this process's rank; world_size: number of ranks sharing the data.
        device: where batches are delivered (CPU tensors alias FFCV buffers; CUDA gets a non-blocking copy).
        flip: apply each view's horizontal flip in the loader (False: leave it to ``DeviceAugment(flip=True)``).
        batches_ahead: batches decoded in advance (memory = (batches_ahead + 2) batch buffers).
        indices: read only these samples of the .beton (None = all); order and sharding are over the subset.
    """
    return FFCVLoader(data_cfg.train_path, data_cfg, seed=seed, rank=rank, world_size=world_size, device=device,
                      flip=flip, batches_ahead=batches_ahead, indices=indices)
