"""Atomic, resumable checkpoints.

A checkpoint is one file ``ckpt_step<step>.pt`` holding the method's ``state_dict`` (student, teacher, loss state such
as centers and queues), optimiser, grad scaler, device-augmentation RNG, global RNG states, the step/epoch and the
resolved config. Files are written to a temporary name in the same directory, fsynced, then renamed, so a killed
job never leaves a file that looks valid. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import os
import random
import re
from typing import Any

import torch

_NAME = re.compile(r"ckpt_step(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong kind; the message names the file."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to ``path`` via a temp file + fsync + rename (atomic on POSIX filesystems)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_step{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, newest first."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_step*.pt")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def prune(run_dir: str, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[keep_last:]:
        os.remove(path)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load and sanity-check one checkpoint; raises CheckpointError naming the file and the problem."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file type ...
        reason = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a flashssl checkpoint (missing 'model'/'config' entries)")
    return ckpt


def find_resumable(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """Newest checkpoint in ``run_dir`` that loads; unreadable ones are reported and skipped."""
    for _, path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"[resume] skipping {e}", flush=True)
    return None
