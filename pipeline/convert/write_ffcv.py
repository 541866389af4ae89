"""[0] Write prepared samples (:class:`pipeline.convert.scan.SpooledSamples`) to an FFCV ``.beton`` with ffcv's writer.

Format (ffcv 1.0.x ``.beton``, read by ``ffcv.loader.Loader`` / :mod:`pipeline.load.ffcv_loader`):

* field ``image``: ``RGBImageField`` with ``write_mode='jpg'``; every sample is stored as one baseline 3-channel JPEG,
  metadata ``(mode=jpg, width, height, data_ptr)``. The JPEG bytes are exactly the ones :func:`pipeline.convert.scan.
  prepare_image` produced (resized with Pillow bicubic, encoded once): ffcv's own ``RGBImageField.encode`` takes a
  decoded array and would encode every image again with OpenCV (a second generation loss and time), so the field
  copies the prepared bytes (:func:`pipeline.load.ffcv_compat.jpeg_passthrough_field`). The stored field type is
  still ``RGBImageField`` (type id 2), so any ffcv reader/decoder works unchanged.
* ffcv's writer is run through :func:`pipeline.load.ffcv_compat.run_ffcv_writer`, which turns the death of a writer
  process (OOM kill, full disk) into an error instead of a hang.
* field ``label``: ``IntField`` (int64 class index, see the ``classes.json`` written next to the file).
* sample ``i`` is the ``i``-th surviving image in listing order (class folders sorted, files sorted), i.e. the
  file is class-sorted; loaders shuffle by index. ``<name>.samples.tsv`` maps index -> label -> source path.
"""

from __future__ import annotations

import functools
import os
import secrets
from multiprocessing import shared_memory
from typing import Any

from pipeline.convert.manifest import SHM_PREFIX
from pipeline.convert.scan import SpooledSamples

MIN_PAGE = 1 << 21  # ffcv's minimum page size (2 MiB)
MAX_DEFAULT_PAGE = 1 << 23  # ffcv's default page size (8 MiB)
MAX_PAGE = 1 << 31


class _SpoolDataset:
    """Indexable (image, label) view of the spool for ``DatasetWriter.from_indexed_dataset`` (one handle/process)."""

    def __init__(self, samples: SpooledSamples):
        self.samples = samples
        self._fh = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from pipeline.load.ffcv_compat import StoredJPEG

        if self._fh is None:
            self._fh = open(self.samples.spool_path, "rb")  # noqa: SIM115 - lives as long as the writer process
        s = self.samples
        return StoredJPEG(s.read(i, self._fh), int(s.heights[i]), int(s.widths[i])), int(s.labels[i])


def _page_size(max_bytes: int, total_bytes: int) -> int:
    """ffcv's default 8 MiB pages for large files, down to its 2 MiB minimum for small ones (the last page of
    the file is padded, so small datasets would otherwise grow by up to 8 MiB); larger only if one JPEG needs it."""
    page = MIN_PAGE
    while page < MAX_DEFAULT_PAGE and page < total_bytes // 64:
        page *= 2
    while page < max_bytes + 4096:
        page *= 2
    if page > MAX_PAGE:
        raise ValueError(f"a stored JPEG of {max_bytes} bytes does not fit an ffcv page; lower --max-side")
    return page


def write_beton(path: str, samples: SpooledSamples, progress: bool = True) -> None:
    """Write ``samples`` to ``path`` (the caller passes a temporary name and renames it when this returns).

    One ffcv writer process: the work is pure byte copying from the spool (disk-bound), and a single writer lays
    samples out in index order, so the file is byte-for-byte reproducible and only its last page is padded.

    Args:
        path: output file (overwritten).
        samples: prepared samples; ``len(samples) > 0``.
        progress: show ffcv's progress bar (labelled; ffcv has no switch, so its module-level ``tqdm`` is
            swapped for a configured one while writing).

    Raises:
        RuntimeError: an ffcv writer process died before all samples were written.
    """
    from pipeline.load import ffcv_compat  # noqa: I001  (first: checks ffcv's version, keeps torch's threads)
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    writer = DatasetWriter(path, {"image": ffcv_compat.jpeg_passthrough_field(), "label": IntField()},
                           page_size=_page_size(int(samples.sizes.max()), int(samples.sizes.sum())), num_workers=1)
    progress_bar = functools.partial(tqdm, desc="ffcv .beton", unit="img", disable=not progress)
    with ffcv_compat.writer_globals_swapped(progress_bar, _OwnedSharedMemory):
        ffcv_compat.run_ffcv_writer(writer, _SpoolDataset(samples), path, chunksize=256)


class _OwnedSharedMemory:
    """Stands in for the ``multiprocessing.shared_memory`` module inside ``ffcv.writer``: the metadata block it
    creates is named ``flashssl-ffcv-<pid>-<hex>`` (not Python's ownerless ``psm_<hex>``), so the next conversion
    can free the block of a writer killed with SIGKILL (:func:`pipeline.convert.manifest.remove_stale_temps`)."""

    @staticmethod
    def SharedMemory(name: str | None = None, create: bool = False, size: int = 0):  # noqa: N802 - module API
        if create and name is None:
            name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        return shared_memory.SharedMemory(name=name, create=create, size=size)
