"""Rank-0 logging: progress bar, JSONL metrics, TensorBoard, and throughput / data-wait timers."""

from __future__ import annotations

import json
import os
import time

from runtime import dist


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.is_main():
        print(msg, flush=True)


class MetricLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard (rank 0)."""

    def __init__(self, run_dir: str, tensorboard: bool):
        self.enabled = dist.is_main()
        self.tb = None
        self.file = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
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

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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
