"""Atomic, resumable checkpoints.

A checkpoint is one file ``ckpt_step<step>.pt`` holding the method's ``state_dict`` (student, teacher, loss state such
as centers and queues), optimiser, grad scaler, device-augmentation RNG, global RNG states, the step/epoch and the
resolved config. Files are written to a temporary name in the same directory, fsynced, then renamed, so a killed
job never leaves a file that looks valid. Loading uses ``torch.load(weights_only=True)``.

A run directory's ``run.json`` (written by :mod:`runtime.run_dir`) lists the checkpoints that run wrote; readers
here consider only those (every ``ckpt_step*.pt`` in a folder without ``run.json``, as written before it existed).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from typing import Any

import torch

from runtime.atomic import atomic_path

_NAME = re.compile(r"ckpt_step(\d+)\.pt$")
RUN_MARKER = "run.json"  # the run directory's owner record, see runtime/run_dir.py


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
    # the temporary's name ``.<name>.tmp.<pid>`` is what runtime.run_dir's stale-file cleanup matches
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with atomic_path(path, tmp) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt_step{step:08d}.pt")


def is_checkpoint_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, newest first."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_step*.pt")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


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


def read_marker(run_dir: str) -> dict[str, Any] | None:
    """The run directory's ``run.json`` (None when absent or unreadable)."""
    try:
        with open(os.path.join(run_dir, RUN_MARKER)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def own_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints the run in ``run_dir`` wrote, newest first: the names its ``run.json`` lists
    that exist (all ``ckpt_step*.pt`` when the folder has no ``run.json``)."""
    marker = read_marker(run_dir)
    if marker is None or not isinstance(marker.get("checkpoints"), list):
        return list_checkpoints(run_dir)
    names = {str(n) for n in marker["checkpoints"]}
    return [(s, p) for s, p in list_checkpoints(run_dir) if os.path.basename(p) in names]


def scan_checkpoints(run_dir: str) -> tuple[tuple[str, dict[str, Any]] | None, list[tuple[str, str]]]:
    """The newest own checkpoint of ``run_dir`` that loads, as (path, state), or None; and the (path, reason) of
    every newer one that did not load."""
    bad = []
    for _, path in own_checkpoints(run_dir):
        try:
            return (path, load_checkpoint(path)), bad
        except CheckpointError as e:
            print(f"[resume] skipping {e}", flush=True)
            bad.append((path, str(e)))
    return None, bad


def short_reason(message: str) -> str:
    """The gist of a load_checkpoint error for lists: its cause without the path, up to the first full stop."""
    cause = message.split("): ", 1)[-1] if " is unreadable (" in message else message
    return cause.split(". ")[0][:160]


def find_resumable(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """Newest own checkpoint in ``run_dir`` that loads; unreadable ones are reported and skipped."""
    return scan_checkpoints(run_dir)[0]


def resolve_checkpoint(spec: str) -> str:
    """A checkpoint file, or a run directory -> its newest readable checkpoint; raises CheckpointError naming what
    was found when there is none."""
    if not os.path.isdir(spec):
        if not os.path.isfile(spec):
            raise CheckpointError(f"checkpoint not found: {spec} (give a ckpt_step*.pt file or a run directory)")
        return spec
    found, bad = scan_checkpoints(spec)
    if found is not None:
        return found[0]
    if bad:
        listed = "; ".join(f"{os.path.basename(p)}: {short_reason(reason)}" for p, reason in bad)
        raise CheckpointError(f"no readable checkpoint in run directory {spec}: {len(bad)} found, all unreadable "
                              f"({listed})")
    raise CheckpointError(f"no checkpoint (ckpt_step*.pt) in run directory {spec}")


# Sections a resumed run may change (run control, evaluation); a difference elsewhere can make the saved state unfit.
_FREE_ON_RESUME = ("train.", "eval.")
_UNSET = "<unset>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(saved: dict, current: dict, only: tuple[str, ...] | None = None) -> list[str]:
    """``key (checkpoint X, this run Y)`` for every dotted config key (outside ``train.*`` / ``eval.*``, or among
    ``only``) whose value differs between a checkpoint's saved config and this run's."""
    a, b = _flatten(saved), _flatten(current)
    keys = (set(a) | set(b)) if only is None else set(only)
    keys = sorted(k for k in keys if not k.startswith(_FREE_ON_RESUME) and a.get(k, _UNSET) != b.get(k, _UNSET))
    return [f"{k} (checkpoint {a.get(k, _UNSET)!r}, this run {b.get(k, _UNSET)!r})" for k in keys]


def mismatch_error(path: str, saved: dict, current: dict, what: str) -> CheckpointError:
    """The error for a checkpoint whose ``what`` (e.g. 'model weights') does not fit this run's config."""
    diff = config_differences(saved, current)
    listed = "; ".join(diff) if diff else "none outside train.*/eval.* (the checkpoint may come from another version)"
    return CheckpointError(
        f"cannot resume from {path}: its {what} do not fit this run's config. Config keys that differ from the "
        f"checkpoint's: {listed}. Resume with the checkpoint's values, or start a new run (a new train.out_dir, or "
        "--overwrite)")
