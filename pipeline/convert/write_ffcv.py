"""[0] Write prepared samples (:class:`pipeline.convert.scan.SpooledSamples`) to an FFCV ``.beton`` with ffcv's writer.

Format (ffcv 1.0.x ``.beton``, read by ``ffcv.loader.Loader`` / :mod:`pipeline.load.ffcv_loader`):

* field ``image``: ``RGBImageField`` with ``write_mode='jpg'``; every sample is stored as one baseline 3-channel JPEG,
  metadata ``(mode=jpg, width, height, data_ptr)``. The JPEG bytes are exactly the ones :func:`pipeline.convert.scan.
  prepare_image` produced (resized with Pillow bicubic, encoded once): ffcv's own ``RGBImageField.encode`` takes a
  decoded array and would encode every image again with OpenCV (a second generation loss and time), so the field
  instance gets an ``encode`` that copies the prepared bytes. The stored field type is still ``RGBImageField``
  (type id 2), so any ffcv reader/decoder works unchanged.
* field ``label``: ``IntField`` (int64 class index, see the ``classes.json`` written next to the file).
* sample ``i`` is the ``i``-th surviving image in listing order (class folders sorted, files sorted), i.e. the
  file is class-sorted; loaders shuffle by index. ``<name>.samples.tsv`` maps index -> label -> source path.
"""

from __future__ import annotations

import _thread
import functools
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from pipeline.convert.manifest import SHM_PREFIX
from pipeline.convert.scan import SpooledSamples

MIN_PAGE = 1 << 21  # ffcv's minimum page size (2 MiB)
MAX_DEFAULT_PAGE = 1 << 23  # ffcv's default page size (8 MiB)
MAX_PAGE = 1 << 31
WATCHDOG_GRACE_S = 30.0  # how long no writer process may be alive before the writer counts as hung


@dataclass(frozen=True)
class _StoredJPEG:
    """A JPEG payload handed to the image field's ``encode``."""

    data: bytes
    height: int
    width: int


def _encode_stored_jpeg(destination: np.ndarray, value: _StoredJPEG, malloc: Any) -> None:
    """``RGBImageField.encode`` replacement: store ``value.data`` verbatim with jpg-mode metadata."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    destination["mode"] = IMAGE_MODES["jpg"]
    destination["height"], destination["width"] = value.height, value.width
    destination["data_ptr"], storage = malloc(len(value.data))
    storage[:] = np.frombuffer(value.data, dtype=np.uint8)


class _SpoolDataset:
    """Indexable (image, label) view of the spool for ``DatasetWriter.from_indexed_dataset`` (one handle/process)."""

    def __init__(self, samples: SpooledSamples):
        self.samples = samples
        self._fh = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[_StoredJPEG, int]:
        if self._fh is None:
            self._fh = open(self.samples.spool_path, "rb")  # noqa: SIM115 - lives as long as the writer process
        s = self.samples
        return _StoredJPEG(s.read(i, self._fh), int(s.heights[i]), int(s.widths[i])), int(s.labels[i])


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


class _ChildWatchdog:
    """Interrupts the main thread if ffcv's writer processes all exit while the writer still waits for samples.

    ``DatasetWriter`` polls a shared counter until every sample is done, then blocks reading each worker's
    allocation table from a queue; if a worker dies (OOM kill, crash, full disk) either wait would last forever.
    The watchdog turns that into a KeyboardInterrupt, which the caller reports as an error.
    Only processes started after ``__enter__`` count as the writer's: a child the caller already had (a DataLoader
    worker kept alive by a stored traceback, say) must not keep the watchdog from firing.
    """

    def __init__(self, grace_s: float | None = None):
        self.grace_s = WATCHDOG_GRACE_S if grace_s is None else grace_s
        self.fired = False
        self._foreign: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # Counted from the start: the writer spawns its processes right away, and a process may die before the
        # first poll. After the processes finish normally the writer only writes two small tables and returns.
        idle_since = time.monotonic()
        while not self._stop.wait(0.2):
            if self.writer_processes():
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.grace_s:
                self.fired = True
                if self._in_main_thread:
                    # A real signal, not interrupt_main(): the main thread may be blocked in a system call (ffcv
                    # waits on a queue for the dead process's allocation table once every sample was counted, as
                    # when the disk fills up on the final page flush), and only a delivered signal wakes it.
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                else:
                    _thread.interrupt_main()
                return

    def writer_processes(self) -> list[multiprocessing.Process]:
        """The live child processes started since ``__enter__`` (ffcv's writer processes)."""
        return [p for p in multiprocessing.active_children() if p.pid not in self._foreign]

    def __enter__(self) -> _ChildWatchdog:
        # interrupt_main() only raises KeyboardInterrupt where SIGINT has a Python handler; a process started in the
        # background by a non-interactive shell (`convert ... &`, nohup) inherits SIGINT ignored, and the watchdog
        # would fire into nothing (the writer-death test hangs under `nohup ... &` without this). Install the default
        # handler for the duration of the write, from the main thread (the only one allowed to).
        self._foreign = {p.pid for p in multiprocessing.active_children()}
        self._saved_sigint = None
        self._in_main_thread = threading.current_thread() is threading.main_thread()
        if self._in_main_thread:
            current = signal.getsignal(signal.SIGINT)
            if not callable(current):
                self._saved_sigint = current
                signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._saved_sigint is not None:
            signal.signal(signal.SIGINT, self._saved_sigint)


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
    import pipeline.load.ffcv_import  # noqa: F401, I001  (before ffcv: keeps torch's threads)
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    image = RGBImageField(write_mode="jpg")
    image.encode = _encode_stored_jpeg  # instance attribute: type(image) stays RGBImageField for the file header
    writer = DatasetWriter(path, {"image": image, "label": IntField()},
                           page_size=_page_size(int(samples.sizes.max()), int(samples.sizes.sum())), num_workers=1)
    saved = ffcv.writer.tqdm, ffcv.writer.shared_memory
    ffcv.writer.tqdm = functools.partial(tqdm, desc="ffcv .beton", unit="img", disable=not progress)
    ffcv.writer.shared_memory = _OwnedSharedMemory
    try:
        run_ffcv_writer(writer, _SpoolDataset(samples), path, chunksize=256)
    finally:
        ffcv.writer.tqdm, ffcv.writer.shared_memory = saved


class _OwnedSharedMemory:
    """Stands in for the ``multiprocessing.shared_memory`` module inside ``ffcv.writer``: the metadata block it
    creates is named ``flashssl-ffcv-<pid>-<hex>`` (not Python's ownerless ``psm_<hex>``), so the next conversion
    can free the block of a writer killed with SIGKILL (:func:`pipeline.convert.manifest.remove_stale_temps`)."""

    @staticmethod
    def SharedMemory(name: str | None = None, create: bool = False, size: int = 0):  # noqa: N802 - module API
        if create and name is None:
            name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        return shared_memory.SharedMemory(name=name, create=create, size=size)


def run_ffcv_writer(writer: Any, dataset: Any, path: str, **kwargs: Any) -> None:
    """``writer.from_indexed_dataset(dataset, **kwargs)`` that cannot hang: if ffcv's writer processes die (OOM
    kill, a full disk, a crash), it stops them, frees ffcv's shared memory and raises instead of polling forever.

    Args:
        writer: an ``ffcv.writer.DatasetWriter`` writing to ``path``.
        dataset: indexable samples for it.
        path: the file being written (named in the error, with the free space left on its filesystem).

    Raises:
        RuntimeError: a writer process died before all samples were written.
    """
    watchdog = _ChildWatchdog()
    try:
        with watchdog:
            writer.from_indexed_dataset(dataset, **kwargs)
    except BaseException as e:
        _cleanup_failed_writer(writer, watchdog.writer_processes())
        if isinstance(e, KeyboardInterrupt) and watchdog.fired:
            raise RuntimeError(f"{path}: an ffcv writer process died before all samples were written "
                               f"({_free_space(path)}; its traceback, if it raised one, is printed above)") from None
        raise


def _free_space(path: str) -> str:
    """'N MiB free on <dir>' for the filesystem holding ``path`` (a full disk is the usual reason a writer dies)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free on {folder}"
    except OSError:
        return f"free space on {folder} unknown"


def _cleanup_failed_writer(writer: Any, processes: list[multiprocessing.Process]) -> None:
    """Stop ffcv's writer ``processes`` and free its shared-memory metadata block after a failure."""
    for child in processes:
        child.terminate()
        child.join(5)
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None and not isinstance(sm, int):
        try:
            sm.close()
            sm.unlink()
        except (FileNotFoundError, OSError):
            pass
