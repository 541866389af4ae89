"""[1] DALI multi-crop loader: webdataset shards -> decode once per image -> one RandomResizedCrop branch per view.

Same interface as :mod:`pipeline.load.ffcv_loader` (``epoch_iter(epoch, start)`` yields :class:`Batch` with V uint8
(B, 3, S_v, S_v) views). :func:`multicrop_graph` builds one graph for both devices (``"gpu"``: nvJPEG ``mixed``
decode and GPU crops; ``"cpu"``: the same operators, so the CPU tests cover the GPU graph's code)::

    external_source -> jpeg bytes, index --+
    decoders.image (once per image) -------+-> random_resized_crop(view 0) -> flip(coin_flip(p_0)) -> output 0
                                           +-> ...                                              -> output V-1

* Input: the shards of ``convert_dataset.py --format dali``; an ``external_source`` slices the memory-mapped tars in
  the order of :func:`pipeline.load.order.shard_indices`, because ``fn.readers.webdataset`` shuffles with a
  streaming buffer and gives ranks unequal shards, and the interface needs an order that depends only on
  (seed, epoch), equal batch counts per rank and a restart at batch ``start``.
* Decode once, crop V times: cheaper than one ROI decode per view (``docs/performance.md``).
* Resize: ``data_cfg.interpolation``, antialiased. A batch stays valid until the next one is requested.
* Randomness: one pipeline per epoch seeded by (seed, epoch, rank). A resume at ``start > 0`` replays the exact sample
  order, but DALI's per-slot generators then draw other crops than the uninterrupted run (FFCV is exact in both).
"""

from __future__ import annotations

import glob
import mmap
import os
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.batch import Batch
from pipeline.config import DataConfig, ViewConfig
from pipeline.load.order import batches_per_rank, shard_indices
from runtime.config_loader import ConfigError
from runtime.seeding import Stream, derive_seed


class ShardIndex:
    """Location (shard, offset, size) of every sample's JPEG in a webdataset directory, plus its label.

    Sample numbering: the integer key of the members (``convert_dataset.py`` writes ``%08d`` of the sample index,
    the same numbering as the ``.beton``); if keys are not integers 0..N-1, samples are numbered in the order of the
    sorted tar files and the members within them. Labels come from ``samples.tsv`` or else the ``.cls`` members.
    """

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise ConfigError(f"data.train_path: {root!r} is not a directory (the dali loader reads the shard "
                              "directory written by convert_dataset.py --format dali)")
        self.tars = sorted(glob.glob(os.path.join(root, "*.tar")))
        if not self.tars:
            raise ConfigError(f"data.train_path: no *.tar webdataset shards in {root!r}")
        rows = []  # (key, shard, jpg offset, jpg size, cls offset, cls size)
        for shard, tar in enumerate(self.tars):
            idx = tar[:-4] + ".idx"
            rows += _read_idx(idx, shard) if os.path.isfile(idx) else _scan_tar(tar, shard)
        if not rows:
            raise ConfigError(f"data.train_path: the shards in {root!r} contain no <key>.jpg samples")
        keys = [r[0] for r in rows]
        if all(k.isdigit() for k in keys) and sorted(int(k) for k in keys) == list(range(len(keys))):
            rows.sort(key=lambda r: int(r[0]))
        self.shard, self.offset, self.size, cls_off, cls_size = (np.array([r[i] for r in rows], dtype=np.int64)
                                                                 for i in range(1, 6))
        self._files = [open(t, "rb") for t in self.tars]
        self._maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in self._files]
        self.labels = self._labels(root, cls_off, cls_size)

    def __len__(self) -> int:
        return len(self.offset)

    def jpeg(self, i: int) -> np.ndarray:
        """(n_bytes,) uint8 view of sample ``i``'s encoded JPEG (no copy)."""
        o = int(self.offset[i])
        return np.frombuffer(self._maps[self.shard[i]], dtype=np.uint8, count=int(self.size[i]), offset=o)

    def _labels(self, root: str, cls_off: np.ndarray, cls_size: np.ndarray) -> np.ndarray:
        tsv = os.path.join(root, "samples.tsv")
        if os.path.isfile(tsv):
            with open(tsv) as f:
                header = f.readline().startswith("index")
            try:
                table = np.loadtxt(tsv, dtype=np.int64, delimiter="\t", usecols=(0, 1), ndmin=2, comments=None,
                                   skiprows=int(header))
            except ValueError:  # rows split by a tab/newline in a file name (older conversions): use <key>.cls
                table = np.zeros((0, 2), dtype=np.int64)
            if len(table) == len(self) and np.array_equal(np.sort(table[:, 0]), np.arange(len(self))):
                labels = np.empty(len(self), dtype=np.int64)
                labels[table[:, 0]] = table[:, 1]
                return labels
        if (cls_size <= 0).any():
            raise ConfigError(f"data.train_path: {root!r} has neither a matching samples.tsv nor a <key>.cls label "
                              "for every sample")
        return np.array([int(bytes(self._maps[s][o:o + n])) for s, o, n in zip(self.shard, cls_off, cls_size)],
                        dtype=np.int64)


def _read_idx(path: str, shard: int) -> list[tuple]:
    """Rows of a DALI ``v1.2`` index file: ``<ext> <offset> <size> <name>`` per member, one sample per line."""
    with open(path) as f:
        header, *lines = f.read().splitlines()
    if not header.startswith("v1.2"):
        raise ConfigError(f"data.train_path: {path}: unsupported index version line {header!r} (expected v1.2)")
    rows = []
    for line in lines:
        tok = line.split()
        members = {tok[j]: (int(tok[j + 1]), int(tok[j + 2]), tok[j + 3]) for j in range(0, len(tok), 4)}
        if "jpg" in members:
            off, size, name = members["jpg"]
            c_off, c_size, _ = members.get("cls", (0, 0, ""))
            rows.append((name.split(".", 1)[0], shard, off, size, c_off, c_size))
    return rows


def _scan_tar(path: str, shard: int) -> list[tuple]:
    """Index rows straight from a tar (shards without ``.idx`` files)."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and "." in os.path.basename(m.name):
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return [(k, shard, *v["jpg"], *v.get("cls", (0, 0))) for k, v in found.items() if "jpg" in v]


def multicrop_graph(jpegs, views: Sequence[ViewConfig], device: str, flip: bool, interpolation: str) -> list:
    """Decode once, then one RandomResizedCrop (+ flip) branch per view. ``device``: "gpu" or "cpu".

    Returns:
        V DALI nodes, each a batch of (S_v, S_v, 3) uint8 HWC crops (on the GPU when ``device == "gpu"``).
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[interpolation]
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    outputs = []
    for v in views:
        crop = fn.random_resized_crop(images, size=(v.size, v.size), random_area=list(v.scale),
                                      random_aspect_ratio=list(v.ratio), interp_type=interp, antialias=True)
        if flip and v.flip_p > 0:
            crop = fn.flip(crop, horizontal=fn.random.coin_flip(probability=v.flip_p))
        outputs.append(crop)
    return outputs


class _EpochSource:
    """``external_source`` callback: batch k of the epoch -> (list of JPEG byte arrays, (B,) int64 indices)."""

    def __init__(self, index: ShardIndex, order: np.ndarray, batch_size: int) -> None:
        self.index, self.order, self.batch_size = index, order, batch_size
        self.batches = len(order) // batch_size

    def __call__(self, info):
        if info.iteration >= self.batches:
            raise StopIteration
        ids = self.order[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        return [self.index.jpeg(int(i)) for i in ids], ids.astype(np.int64)


class DALILoader:
    """Multi-crop batches from webdataset shards through DALI (module docstring; build with build_dali_loader)."""

    def __init__(self, path: str, data_cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 device: torch.device, flip: bool = True, prefetch: int = 2) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"DALILoader: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.index = ShardIndex(path)
        self.views = data_cfg.expanded_views()
        self.cfg, self.seed, self.rank, self.world_size = data_cfg, seed, rank, world_size
        self.device, self.flip, self.prefetch = device, flip, prefetch
        self.batches = batches_per_rank(len(self.index), data_cfg.batch_size, world_size)
        self._active = None

    def __len__(self) -> int:
        return self.batches

    def _pipeline(self, epoch: int, start: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        bs = self.cfg.batch_size
        order = shard_indices(len(self.index), bs, self.seed, epoch, self.rank, self.world_size)[start * bs:]
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu \
            else None
        # ranks need their own seed or same-slot samples get correlated crops; DALI takes a non-negative int32
        seed = derive_seed(Stream.DALI_PIPELINE, self.seed, epoch, self.rank, bits=31)
        pipe = Pipeline(batch_size=bs, num_threads=max(1, self.cfg.workers), device_id=device_id, seed=seed,
                        prefetch_queue_depth=self.prefetch)
        with pipe:
            jpegs, idx = fn.external_source(source=_EpochSource(self.index, order, bs), num_outputs=2, batch=True,
                                            batch_info=True, dtype=[types.UINT8, types.INT64])
            crops = multicrop_graph(jpegs, self.views, "gpu" if gpu else "cpu", self.flip, self.cfg.interpolation)
            pipe.set_outputs(*crops, idx)
        return pipe

    def epoch_iter(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, ..., len(self)-1`` of ``epoch`` for this rank (the pipeline is built on this call)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if not 0 <= start <= len(self):
            raise ValueError(f"epoch_iter: start must be in [0, {len(self)}], got {start}")
        self._active = None  # release the previous epoch's pipeline (and its threads/buffers) first
        if start == len(self):
            return iter(())
        names = [f"view{k}" for k in range(len(self.views))] + ["index"]
        self._active = DALIGenericIterator(self._pipeline(epoch, start), names, auto_reset=False,
                                           last_batch_policy=LastBatchPolicy.DROP)
        return self._batches(self._active, names)

    def _batches(self, it, names: list[str]) -> Iterator[Batch]:
        n_global = self.cfg.n_global
        for out in it:
            d = out[0]
            indices = d["index"].reshape(-1).to("cpu", torch.int64, copy=True)  # the iterator refills its buffers
            labels = torch.from_numpy(self.index.labels[indices.numpy()])
            views = [d[n].permute(0, 3, 1, 2) for n in names[:-1]]  # HWC -> (B, 3, S, S) channels-last, no copy
            yield Batch(views=views, labels=labels.to(views[0].device), indices=indices.to(views[0].device),
                        n_global=n_global)


def build_dali_loader(data_cfg: DataConfig, *, seed: int, rank: int, world_size: int, device: torch.device,
                      flip: bool = True, prefetch: int = 2) -> DALILoader:
    """Build the DALI multi-crop loader for ``data_cfg.train_path`` (a shard directory); see the module docstring.

    Args:
        data_cfg: data section of the config (path, batch size, workers = DALI CPU threads, views, interpolation).
        seed: base seed; sample order is a function of (seed, epoch), crops of (seed, epoch, rank).
        rank: this process's rank; world_size: number of ranks sharing the data.
        device: CUDA -> nvJPEG ``mixed`` decode and GPU crops on that device; CPU -> the CPU-only graph.
        flip: apply each view's horizontal flip in the loader (False: leave it to ``DeviceAugment(flip=True)``).
        prefetch: DALI prefetch queue depth (batches prepared ahead).
    """
    return DALILoader(data_cfg.train_path, data_cfg, seed=seed, rank=rank, world_size=world_size, device=device,
                      flip=flip, prefetch=prefetch)
