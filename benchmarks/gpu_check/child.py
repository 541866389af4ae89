"""What a performance stage's process shares: the device and size it was asked for, and a recorder that rewrites the
stage's result file after every number (a stage killed at its budget keeps what it measured). torch is imported
where it is used, so that a stage can start recording before torch has loaded."""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from runtime.atomic import write_text_atomic

if TYPE_CHECKING:
    import torch

DEVICE_ENV, TINY_ENV = "FLASHSSL_CHECK_DEVICE", "FLASHSSL_CHECK_TINY"


def device() -> torch.device:
    """The check's device: ``cuda`` unless the test-only ``--device cpu`` set FLASHSSL_CHECK_DEVICE=cpu."""
    import torch

    return torch.device(os.environ.get(DEVICE_ENV, "cuda"))


def tiny() -> bool:
    """True under the test-only ``--tiny``: CPU-sized shapes that run the same code paths in seconds."""
    return os.environ.get(TINY_ENV) == "1"


def work_dir(*parts: str) -> str:
    """A folder under the check's working folder (``GPU_CHECK_WORK``, set by the runner; the system temp folder
    when a child is run by hand)."""
    import tempfile

    path = os.path.join(os.environ.get("GPU_CHECK_WORK") or tempfile.gettempdir(), *parts)
    os.makedirs(path, exist_ok=True)
    return path


def sync(dev: torch.device) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_seconds(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Recorder:
    """Collects ``{"name", "value", "unit", ...}`` measurements and writes them to ``GPU_CHECK_RESULT`` at once."""

    def __init__(self, path: str | None = None):
        self.path = path or os.environ.get("GPU_CHECK_RESULT")
        self.measurements: list[dict] = []
        self.notes: list[str] = []
        self.status = "passed"

    def add(self, name: str, value: float | None, unit: str, goal: str = "", met: bool | None = None,
            note: str = "") -> None:
        row = {"name": name, "value": value, "unit": unit}
        if goal:
            row["goal"] = goal
        if met is not None:
            row["met"] = bool(met)
        if note:
            row["note"] = note
        self.measurements.append(row)
        self.flush()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.flush()

    def failed(self, what: str, exc: BaseException) -> None:
        """Record that one measurement raised (the stage goes on with the next one) and mark the stage failed."""
        self.status = "failed"
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        self.note(f"{what} failed: {last[:400]}")

    def flush(self) -> None:
        if not self.path:
            return
        write_text_atomic(self.path, json.dumps({"status": self.status, "note": " ".join(self.notes),
                                                 "measurements": self.measurements}))

    def attempt(self, what: str, fn: Callable[[], object]) -> object | None:
        """Run ``fn``; on an exception record it and return None (the caller moves on)."""
        try:
            return fn()
        except Exception as exc:  # any failure of one measurement is reported, not fatal
            self.failed(what, exc)
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
