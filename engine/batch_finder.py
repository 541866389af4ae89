"""``train.py --find-batch-size``: the largest per-device batch whose real training step fits in memory.

A candidate batch *fits* when the run's recipe (method, model, views, precision, optimizer, loader) completes
``steps`` real training steps (:func:`engine.scratch_run.training_steps`: the Trainer's own ``train_step``; two by
default, because the optimizer state is allocated in the first step and lives through the second) within memory:

* **CUDA** (in this process): no ``torch.cuda.OutOfMemoryError``, and, with a budget, a peak of
  ``torch.cuda.max_memory_reserved`` (the caching allocator's high-water mark: what the process holds from the
  device) <= the budget.
* **CPU** (a fresh ``spawn`` process per candidate, so one candidate's memory cannot hide another's): the peak
  resident set size of that process (``getrusage(RUSAGE_SELF).ru_maxrss``: Python, torch, the model, optimizer state,
  activations, the batch and in-process loader threads; loader *worker processes* are not counted) <= the budget. A
  watchdog thread samples the RSS every 5 ms and stops the process as soon as it crosses the budget, so an oversized
  candidate never exhausts the machine.

Search: start at ``data.batch_size`` (rounded to ``multiple``), double while it fits, then bisect between the last
fit and the first failure down to ``multiple``. ``max_batch`` bounds the search (default: the training images per
rank). Nothing is written to ``train.out_dir`` (see :mod:`engine.scratch_run`).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.config import Config, config_from_dict, config_to_dict
from engine.scratch_run import scratch_trainer, training_steps
from runtime.config_loader import ConfigError
from runtime.logging import log

BUDGET_EXCEEDED = 3  # exit code of a CPU probe stopped by its watchdog


@dataclass
class Probe:
    """One measured candidate: ``fits``, the peak memory in bytes (as defined in the module docstring), why not."""

    batch: int
    fits: bool
    peak_bytes: int
    seconds: float
    reason: str = ""


@dataclass
class BatchSearch:
    best: int
    measured: str  # what peak_bytes is
    probes: list[Probe] = field(default_factory=list)


def search_batch(fits: Callable[[int], bool], start: int, max_batch: int, multiple: int) -> int:
    """Largest multiple of ``multiple`` in [multiple, max_batch] for which the monotone ``fits`` holds (0 if none)."""
    if multiple < 1 or max_batch < multiple:
        raise ConfigError(f"--max-batch-size: need max_batch >= multiple >= 1, got {max_batch} and {multiple}")
    top = max_batch // multiple * multiple
    b = min(max(multiple, start // multiple * multiple), top)
    lo, hi = 0, None  # lo: largest known fit; hi: smallest known failure
    while hi is None:
        if not fits(b):
            hi = b
        elif b >= top:
            return b
        else:
            lo, b = b, min(2 * b, top)
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ------------------------------------------------------------------ CUDA: in process
def probe_cuda(cfg: Config, batch: int, steps: int, budget_bytes: int | None) -> Probe:
    t0 = time.perf_counter()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with scratch_trainer(cfg, batch) as trainer:
            for _ in training_steps(trainer, steps):
                pass
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as e:
        return Probe(batch, False, torch.cuda.max_memory_reserved(), time.perf_counter() - t0,
                     f"CUDA out of memory: {str(e).splitlines()[0]}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_reserved()
    ok = budget_bytes is None or peak <= budget_bytes
    return Probe(batch, ok, peak, time.perf_counter() - t0, "" if ok else "peak reserved memory above the budget")


# ------------------------------------------------------------------ CPU: one fresh process per candidate
def _watchdog(budget_bytes: int, results: mp.Queue) -> None:
    import psutil

    me = psutil.Process()
    while True:
        rss = me.memory_info().rss
        if rss > budget_bytes:
            results.put({"fits": False, "peak_bytes": rss, "reason": "resident memory crossed the budget"})
            results.close()
            results.join_thread()
            os._exit(BUDGET_EXCEEDED)
        time.sleep(0.005)


def _cpu_child(cfg_dict: dict, batch: int, steps: int, budget_bytes: int, results: mp.Queue) -> None:
    threading.Thread(target=_watchdog, args=(budget_bytes, results), daemon=True).start()
    cfg = config_from_dict(cfg_dict)
    try:
        with scratch_trainer(cfg, batch) as trainer:
            for _ in training_steps(trainer, steps):
                pass
    except ConfigError as e:
        results.put({"error": str(e)})
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    results.put({"fits": peak <= budget_bytes, "peak_bytes": peak,
                 "reason": "" if peak <= budget_bytes else "peak resident memory above the budget"})


def probe_cpu(cfg: Config, batch: int, steps: int, budget_bytes: int, timeout_s: float = 3600.0) -> Probe:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_cpu_child, args=(config_to_dict(cfg), batch, steps, budget_bytes, results))
    proc.start()
    try:
        res = results.get(timeout=timeout_s)
    except queue.Empty:
        res = None
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        proc.join()
    seconds = time.perf_counter() - t0
    if res is None:
        if proc.exitcode == -9:  # SIGKILL: the kernel's OOM killer (the machine ran out before the budget did)
            return Probe(batch, False, 0, seconds, "killed by SIGKILL (out of memory)")
        raise RuntimeError(f"batch-size probe at batch {batch} died with exit code {proc.exitcode} and no result "
                           "(run train.py at this batch to see the error)")
    if "error" in res:
        raise ConfigError(f"batch {batch}: {res['error']}")
    return Probe(batch, bool(res["fits"]), int(res["peak_bytes"]), seconds, res["reason"])


def find_batch_size(cfg: Config, budget_gb: float | None, max_batch: int = 0, multiple: int = 8,
                    steps: int = 2) -> BatchSearch:
    """Search as described in the module docstring; logs every probe. ``budget_gb`` is required on the CPU."""
    from engine.setup import pick_device

    cuda = pick_device(cfg.train.device).type == "cuda"
    if not cuda and not budget_gb:
        raise ConfigError("--memory-budget-gb: required on the CPU (the peak resident memory a step may use), "
                          "e.g. --memory-budget-gb 8")
    if budget_gb is not None and budget_gb <= 0:
        raise ConfigError(f"--memory-budget-gb: must be > 0, got {budget_gb}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--find-batch-size: run it in one process (not under torchrun); it measures one device")
    budget = int(budget_gb * 2**30) if budget_gb else None
    max_batch = max_batch or _train_images(cfg)
    what = "peak reserved CUDA memory" if cuda else "peak RSS of the probe process"
    how = "torch.cuda.max_memory_reserved" if cuda else "getrusage ru_maxrss of a fresh process"
    search = BatchSearch(0, f"{what} ({how}) over {steps} real training steps")

    def fits(b: int) -> bool:
        p = probe_cuda(cfg, b, steps, budget) if cuda else probe_cpu(cfg, b, steps, budget)
        search.probes.append(p)
        verdict = "fits" if p.fits else f"does not fit ({p.reason})"
        log(f"[find-batch-size] batch {b}: {what} {p.peak_bytes / 2**30:.2f} GiB, {p.seconds:.1f} s -> {verdict}")
        return p.fits

    search.best = search_batch(fits, cfg.data.batch_size, max_batch, multiple)
    if search.best == 0:
        raise ConfigError(f"--memory-budget-gb: not even batch {multiple} fits ({search.probes[-1].reason}); "
                          "raise the budget or use a smaller recipe")
    return search


def _train_images(cfg: Config) -> int:
    """Training images (the largest batch a loader can draw): batches of one from the loader the recipe builds."""
    import dataclasses

    from pipeline import build_loader

    one = dataclasses.replace(cfg.data, batch_size=1)
    loader = build_loader(one, seed=cfg.train.seed, rank=0, world_size=1, device=torch.device("cpu"))
    n = len(loader)
    getattr(loader, "close", lambda: None)()
    return n
