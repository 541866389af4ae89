"""Rank-0 logging: progress bar, JSONL metrics, TensorBoard, and throughput / data-wait timers."""

from __future__ import annotations

import json
import os
import time

from runtime import dist
from runtime.atomic import atomic_path


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(msg, flush=True)


class MetricLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard (rank 0).

    The run continues from ``start_step``: rows of a previous run in the same folder logged after that step are
    dropped (all of them for a fresh run, ``start_step=0``; those after the checkpoint for a resumed one), so the
    file and TensorBoard show one run's history without duplicated or foreign steps.
    """

    def __init__(self, run_dir: str, tensorboard: bool, start_step: int = 0):
        self.enabled = dist.is_main()
        self.tb = None
        self.file = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        _truncate_after(path, start_step)
        self.file = open(path, "a")  # noqa: SIM115 - open for the whole run, closed by close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides earlier event files' steps >= start_step from TensorBoard
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step)
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def event(self, step: int, row: dict) -> None:
        """Write a non-scalar row (e.g. ``{"event": "collapse", ...}``) to ``metrics.jsonl`` only (not TensorBoard)."""
        if self.enabled:
            self.file.write(json.dumps({"step": step, **row}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def jsonl_rows(path: str):
    """``(line, row)`` for each line of a metrics JSONL file that parses to a dict with an integer ``step``; the
    unreadable tail of a killed writer is skipped."""
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                yield line, row


def _truncate_after(path: str, step: int) -> None:
    """Keep only the rows of JSONL ``path`` with ``row['step'] <= step`` (atomic rewrite; unreadable tail lines of a
    killed writer are dropped too)."""
    if not os.path.exists(path):
        return
    kept = [line if line.endswith("\n") else line + "\n" for line, row in jsonl_rows(path) if row["step"] <= step]
    with atomic_path(path, f"{path}.tmp-{os.getpid()}") as tmp, open(tmp, "w") as f:  # name: run_dir's stale cleanup
        f.writelines(kept)


class Throughput:
    """Images/s and the fraction of wall time spent waiting for data, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = 0
        self.wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.wait += data_wait

    def read(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.images / dt, self.wait / dt
