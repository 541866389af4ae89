"""The one module that touches ffcv's private internals; everything else calls the named helpers below.

ffcv has no stable API for what the loaders need (decode once, crop many; a custom sharded order; resumable epochs;
a writer that cannot hang), so this project reaches into ffcv 1.0.2 in a handful of places. They are all here, and
importing this module checks the installed ffcv against :data:`TESTED_VERSIONS` once, so an ffcv upgrade fails in
one place with a message that names this file instead of misbehaving somewhere in a training run.

What each helper relies on:

* Import: ``ffcv.pipeline.compiler`` calls ``torch.set_num_threads(1)`` when first imported, and ``Loader`` (its
  constructor and every ``iter``) resizes torch's intra-op pool to ``num_workers``. This module imports ffcv with
  torch's thread count saved and restored; :func:`torch_threads_kept` does the same around ``Loader`` calls. Import
  this module before any other ffcv import of a process.
* :data:`memcpy_c`, :data:`imdecode_c`, :data:`resize_c`: C functions of ``ffcv._libffcv`` bound with ctypes (their
  signatures are not public) so numba can call them from compiled code.
* :func:`traversal_order`: a ``TraversalOrder`` instance that ``Loader`` binds by calling it (``order(loader)``).
* :func:`first_page_of_samples`: ``loader.memory_manager.sample_to_pages``.
* :func:`reuse_batch_buffers`: replaces ``loader.graph.allocate_memory`` with a cached version.
* :func:`start_epoch`, :func:`next_batch`, :func:`stop_epoch`: ``Loader.next_epoch`` and the ``EpochIterator``
  thread's ``output_queue``, CUDA streams and ``close``.
* :func:`field_metadata`: the per-field metadata table of a ``Reader`` (stored as ``f<field index>``).
* Writer: :func:`jpeg_passthrough_field` (``RGBImageField.encode``), :func:`writer_globals_swapped`
  (``ffcv.writer.tqdm`` / ``ffcv.writer.shared_memory``), :func:`run_ffcv_writer` (a watchdog that turns the death
  of a writer process into an error, and frees ``DatasetWriter.metadata_sm``).
"""

from __future__ import annotations  # noqa: I001  (the version check and thread save precede the ffcv imports)

import _thread
import ctypes
import importlib.metadata
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TESTED_VERSIONS = ("1.0.2",)
WATCHDOG_GRACE_S = 30.0  # how long no writer process may be alive before the writer counts as hung


class FFCVVersionError(RuntimeError):
    """The installed ffcv is not a version whose internals :mod:`pipeline.load.ffcv_compat` was checked against."""


def installed_version() -> str:
    """The installed ffcv distribution's version (``ffcv.__version__`` of 1.0.2 still says 0.0.3rc1)."""
    return importlib.metadata.version("ffcv")


def check_ffcv_version(version: str) -> None:
    """Raise :class:`FFCVVersionError` unless ``version`` is one of :data:`TESTED_VERSIONS`."""
    if version not in TESTED_VERSIONS:
        raise FFCVVersionError(
            f"ffcv {version} is installed, but the ffcv loaders were tested with ffcv {', '.join(TESTED_VERSIONS)} "
            f"and use its private internals: install ffcv=={TESTED_VERSIONS[-1]} (requirements.txt), or check every "
            f"helper in pipeline/load/ffcv_compat.py against ffcv {version} and add it to TESTED_VERSIONS there")


check_ffcv_version(installed_version())
_threads = torch.get_num_threads()
import ffcv.pipeline.compiler  # noqa: E402, F401  (the import that sets torch's threads to 1)
import ffcv.writer  # noqa: E402
from ffcv import _libffcv  # noqa: E402
from ffcv.fields import RGBImageField  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES  # noqa: E402
from ffcv.loader.epoch_iterator import IS_CUDA  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402

torch.set_num_threads(_threads)

JPG_MODE = IMAGE_MODES["jpg"]  # the ``mode`` metadata value of a JPEG-stored RGBImageField sample

# ------------------------------------------------------------------------------------------------ C functions
_LIB = ctypes.CDLL(_libffcv.__file__)
# Called directly as ctypes functions (numba compiles ctypes calls natively); ffcv's Python wrappers would need a
# numba dispatcher each, and calling one dispatcher with literal arguments from a second loader's code trips a
# numba overload-bookkeeping KeyError.
memcpy_c = _LIB.my_memcpy  # (source, destination, n_bytes); callable from numba and from Python
memcpy_c.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
memcpy_c.restype = None
# imdecode (libjpeg-turbo): (src, src_size, h, w, dst, crop_h, crop_w, off_x, off_y, scale_num, scale_den, crop, flip)
imdecode_c = _LIB.imdecode
imdecode_c.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_uint32, ctypes.c_bool, ctypes.c_bool]
imdecode_c.restype = ctypes.c_int
resize_c = _LIB.resize  # OpenCV INTER_AREA: (0, src, src_h, src_w, row0, row1, col0, col1, dst, dst_h, dst_w)
resize_c.argtypes = [ctypes.c_int64] * 11
resize_c.restype = None


# ------------------------------------------------------------------------------------------------ loader
@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count after the block (``Loader`` and ``iter(loader)`` resize it)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def traversal_order(bind: Callable[[Any, np.ndarray], None], sample_order: Callable[[int], np.ndarray]):
    """An object for ``Loader(order=...)`` that delegates to plain functions.

    Args:
        bind: called once with ``(loader, indices)`` when the ``Loader`` is built; ``indices`` are the (n,) int64
            sample ids the loader reads.
        sample_order: ``epoch -> positions`` into ``indices`` in the order to read them.
    """

    class _Order(TraversalOrder):
        def __init__(self) -> None:  # not TraversalOrder.__init__: Loader calls the instance with itself
            pass

        def __call__(self, loader) -> _Order:
            super().__init__(loader)
            bind(loader, self.indices)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.indices[sample_order(epoch)]

    return _Order()


def first_page_of_samples(loader, n: int) -> np.ndarray:
    """(n,) int64: the first file page holding each sample's data."""
    page = np.full(n, -1, dtype=np.int64)
    for sid, pages in loader.memory_manager.sample_to_pages.items():
        page[int(sid)] = min(int(p) for p in pages)
    return page


def reuse_batch_buffers(loader) -> None:
    """Allocate the loader's batch buffers once, not at every epoch.

    A fresh allocation of (batches_ahead + 2) batches is page-faulted in again each epoch. Safe only when an epoch's
    iterator is always stopped (:func:`stop_epoch`) before the next one starts.
    """
    graph, cache = loader.graph, {}
    allocate = graph.allocate_memory

    def allocate_once(batch_size: int, batches_ahead: int):
        if (batch_size, batches_ahead) not in cache:
            cache[(batch_size, batches_ahead)] = allocate(batch_size, batches_ahead)
        return cache[(batch_size, batches_ahead)]

    graph.allocate_memory = allocate_once


def start_epoch(loader, epoch: int):
    """Start ``loader``'s background thread on ``epoch`` (decoding begins now); returns the epoch iterator."""
    loader.next_epoch = epoch
    with torch_threads_kept():
        return iter(loader)


def next_batch(it) -> tuple | None:
    """The iterator's next tuple of pipeline outputs, or None at the end of the epoch.

    Unlike ``EpochIterator.__next__`` it fails loudly instead of blocking forever when the decoding thread dies.
    """
    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive():
                try:
                    item = it.output_queue.get_nowait()  # the thread may have finished between the two checks
                    break
                except queue.Empty:
                    raise RuntimeError("FFCV's decoding thread stopped before the end of the epoch (its traceback "
                                       "is printed above)") from None
    if item is None:
        it.close()
        return None
    slot, result = item
    if IS_CUDA:  # the batch was produced on a side stream (same as EpochIterator.__next__)
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


def stop_epoch(it, timeout_s: float) -> None:
    """Stop an epoch iterator's thread and wait (up to ``timeout_s``) for it to exit."""
    it.close()
    deadline = time.monotonic() + timeout_s
    while it.is_alive() and time.monotonic() < deadline:
        try:  # drain: at the end of an epoch the thread does a blocking put() of its end marker
            it.output_queue.get(timeout=0.1)
        except queue.Empty:
            pass


def field_metadata(reader, name: str) -> np.ndarray:
    """(num_samples,) structured metadata of field ``name`` of an ffcv ``Reader``."""
    return reader.metadata[f"f{list(reader.handlers).index(name)}"]


# ------------------------------------------------------------------------------------------------ writer
@dataclass(frozen=True)
class StoredJPEG:
    """An already encoded JPEG for :func:`jpeg_passthrough_field`."""

    data: bytes
    height: int
    width: int


def _encode_stored_jpeg(destination: np.ndarray, value: StoredJPEG, malloc: Any) -> None:
    """``RGBImageField.encode`` replacement: store ``value.data`` verbatim with jpg-mode metadata."""
    destination["mode"] = JPG_MODE
    destination["height"], destination["width"] = value.height, value.width
    destination["data_ptr"], storage = malloc(len(value.data))
    storage[:] = np.frombuffer(value.data, dtype=np.uint8)


def jpeg_passthrough_field() -> RGBImageField:
    """An ``RGBImageField(write_mode='jpg')`` whose samples are :class:`StoredJPEG` bytes, stored without re-encoding.

    The field's type stays ``RGBImageField`` (the file header records the type), so any ffcv reader decodes it.
    """
    field = RGBImageField(write_mode="jpg")
    field.encode = _encode_stored_jpeg  # an instance attribute: type(field) stays RGBImageField
    return field


@contextmanager
def writer_globals_swapped(progress_bar: Callable, shared_memory_module: Any) -> Iterator[None]:
    """Within the block, ``DatasetWriter`` shows ``progress_bar`` (a ``tqdm``-like callable) and creates its metadata
    block with ``shared_memory_module.SharedMemory`` (ffcv has no parameters for either)."""
    saved = ffcv.writer.tqdm, ffcv.writer.shared_memory
    ffcv.writer.tqdm, ffcv.writer.shared_memory = progress_bar, shared_memory_module
    try:
        yield
    finally:
        ffcv.writer.tqdm, ffcv.writer.shared_memory = saved


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
    if sm is not None and not isinstance(sm, int):  # an int placeholder until the block is created
        try:
            sm.close()
            sm.unlink()
        except (FileNotFoundError, OSError):
            pass
