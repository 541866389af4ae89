"""The run directory (``train.out_dir``): one run per folder, claimed at start, never silently reused or mixed.

A start does, in order, on rank 0 (the outcome, or the error, is broadcast to the other ranks):

1. **Path check**: an existing file, or a folder that cannot be created or written, is a ConfigError naming the
   path and the fix.
2. ``--overwrite``: a non-empty folder is renamed to ``<out_dir>.old-<UTC time>`` (nothing is deleted) and the run
   starts in a new, empty one.
3. **Stale temporaries** of killed processes (``.ckpt_step*.pt.tmp.<pid>``, ``metrics.jsonl.tmp-<pid>``,
   ``.run.json.tmp-<pid>`` whose pid no longer runs) are removed, each with a message.
4. **Claim**: a fresh run (no ``--resume``) needs a folder without results (empty, or left by a start that failed
   before its first logged step); one that holds anything else is refused with the choices (``--resume auto``, a
   new ``train.out_dir``, ``--overwrite``). A resumed run adopts the folder's run (its ``run.json``; a folder from
   before ``run.json`` existed is adopted with all its checkpoints).
5. **Resume** (``--resume auto`` or the run directory itself): the newest own checkpoint that loads. Unreadable ones
   are moved to ``corrupt/`` (never counted, never pruned); if none loads although some existed, the start stops
   with the list instead of silently beginning again.

``run.json`` = ``{"run_id", "created", "started_from", "checkpoints": [names this run wrote]}``. A checkpoint's
name is added *before* the file is written, so after a kill at any point every own file is listed; :meth:`RunDir.
prune` keeps the newest ``train.keep_last`` listed files and never touches a file the run did not write.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from runtime import checkpoint as ckpt
from runtime import dist
from runtime.atomic import atomic_path
from runtime.config_loader import ConfigError
from runtime.logging import log as _log
from runtime.procs import remove_stale

CORRUPT_DIR = "corrupt"
_STALE = re.compile(r"^(?:\.ckpt_step\d+\.pt\.tmp\.|metrics\.jsonl\.tmp-|\.run\.json\.tmp-)(?P<pid>\d+)$")
_CHOICES = ("--resume auto (continue it), a new train.out_dir=... (keep it and start elsewhere), or --overwrite "
            "(move it to {path}.old-<time> and start fresh)")

Log = Callable[[str], None]


class RunDirError(ConfigError):
    """``train.out_dir`` cannot be used as asked; the message names the folder and the choices."""


# ------------------------------------------------------------------------------------------------ the path


def check_out_dir(path: str) -> None:
    """Raise ConfigError unless ``path`` is (or can be created as) a writable folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"train.out_dir {path} is an existing file, not a folder; set train.out_dir to a folder "
                          "path (a new or an empty one)")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"train.out_dir {path} cannot be created: {probe} is a file; choose another train.out_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir {path} is not writable ({probe}: read-only filesystem or no permission); "
                          "choose a writable train.out_dir or fix the permissions")


def _os_error(path: str, e: OSError) -> ConfigError:
    return ConfigError(f"train.out_dir {path}: cannot write there ({e.strerror or e}); choose a writable "
                       "train.out_dir or fix the permissions")


def move_aside(path: str, log: Log = _log) -> str | None:
    """``--overwrite``: rename a non-empty ``path`` to ``<path>.old-<UTC time>``; returns the new name."""
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    base = f"{os.path.normpath(path)}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    dest, n = base, 1
    while os.path.lexists(dest):
        dest, n = f"{base}-{n}", n + 1
    try:
        os.rename(path, dest)
    except OSError as e:
        raise _os_error(path, e) from None
    log(f"[run] --overwrite: moved the previous contents of {path} to {dest} (delete it when no longer needed)")
    return dest


# What a start writes before any result: a folder holding only these (metrics.jsonl empty) holds no run yet
_BOOKKEEPING = {ckpt.RUN_MARKER, "config.yaml", "metrics.jsonl", "tb"}


def _metric_rows(path: str) -> int:
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def holds_results(path: str) -> bool:
    """Whether ``path`` holds anything a fresh run must not overwrite (a run that logged or saved something, or
    files that are not a run's). A start that failed before its first logged step leaves nothing of value."""
    entries = set(os.listdir(path))
    return bool(entries - _BOOKKEEPING) or _metric_rows(path) > 0


def describe(path: str) -> str:
    """What a used run folder holds, for messages: checkpoints, metrics rows, other entries."""
    steps = [s for s, _ in ckpt.list_checkpoints(path)]
    parts = [f"{len(steps)} checkpoint(s) up to step {max(steps)}"] if steps else []
    if _metric_rows(path):
        parts.append(f"metrics.jsonl with {_metric_rows(path)} rows")
    others = sorted(e for e in os.listdir(path) if e != "metrics.jsonl" and not ckpt.is_checkpoint_name(e))
    if others:
        parts.append(", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else ""))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ the run


class RunDir:
    """The claimed run folder: its ``run.json`` ledger of own checkpoints, pruning and the corrupt quarantine."""

    def __init__(self, path: str, marker: dict[str, Any], log: Log = _log):
        self.path, self.marker, self.log = path, marker, log

    @property
    def run_id(self) -> str:
        return str(self.marker["run_id"])

    @classmethod
    def create(cls, path: str, started_from: str | None = None, checkpoints: list[str] | None = None,
               log: Log = _log) -> RunDir:
        marker = {"run_id": uuid.uuid4().hex[:12], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "started_from": started_from, "checkpoints": checkpoints or []}
        run = cls(path, marker, log)
        run._write_marker()
        return run

    @classmethod
    def adopt(cls, path: str, log: Log = _log) -> RunDir:
        """The run already in ``path`` (or a new one in an empty folder)."""
        marker = ckpt.read_marker(path)
        if marker is not None and "run_id" in marker and isinstance(marker.get("checkpoints"), list):
            return cls(path, marker, log)
        names = [os.path.basename(p) for _, p in ckpt.list_checkpoints(path)]
        if names:
            log(f"[run] {path} has no {ckpt.RUN_MARKER} (written before runs were claimed): adopting its "
                f"{len(names)} checkpoint(s)")
        return cls.create(path, checkpoints=names, log=log)

    def _write_marker(self) -> None:
        try:  # the temporary (.run.json.tmp-<pid>) is the name the stale-file cleanup below matches
            with atomic_path(os.path.join(self.path, ckpt.RUN_MARKER)) as tmp, open(tmp, "w") as f:
                json.dump(self.marker, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _os_error(self.path, e) from None

    def _set_checkpoints(self, names: list[str]) -> None:
        self.marker["checkpoints"] = sorted(set(names))
        self._write_marker()

    def will_write(self, path: str) -> None:
        """Record checkpoint ``path`` as this run's before it is written (a kill after this leaves no orphan)."""
        self._set_checkpoints([*self.marker["checkpoints"], os.path.basename(path)])

    def prune(self, keep_last: int) -> None:
        """Delete this run's checkpoints beyond the newest ``keep_last``; other files in the folder are not counted."""
        own = ckpt.own_checkpoints(self.path)
        for _, path in own[keep_last:]:
            os.remove(path)
        self._set_checkpoints([os.path.basename(p) for _, p in own[:keep_last]])

    def quarantine(self, path: str, reason: str) -> str:
        """Move an unreadable checkpoint to ``corrupt/`` (out of the ledger): it is never resumed or pruned."""
        folder = os.path.join(self.path, CORRUPT_DIR)
        os.makedirs(folder, exist_ok=True)
        name = os.path.basename(path)
        dest = os.path.join(folder, name)
        n = 1
        while os.path.lexists(dest):
            dest, n = os.path.join(folder, f"{name}.{n}"), n + 1
        os.replace(path, dest)
        self._set_checkpoints([c for c in self.marker["checkpoints"] if c != name])
        self.log(f"[resume] moved unreadable {path} to {dest} ({ckpt.short_reason(reason)})")
        return dest

    def select_resume(self) -> tuple[str, dict[str, Any]] | None:
        """Newest own checkpoint that loads, quarantining the unreadable ones on the way; None when the run never
        wrote one. Raises CheckpointError when checkpoints existed but none loads."""
        found, bad = ckpt.scan_checkpoints(self.path)
        moved = [(self.quarantine(p, reason), reason) for p, reason in bad]
        if found is not None:
            return found
        folder = os.path.join(self.path, CORRUPT_DIR)
        earlier = sorted(set(os.listdir(folder)) - {os.path.basename(m) for m, _ in moved}) \
            if os.path.isdir(folder) else []
        if not moved and not earlier:
            return None
        listed = [f"{os.path.basename(m)} ({ckpt.short_reason(reason)})" for m, reason in moved]
        listed += [f"{e} (moved there by an earlier start)" for e in earlier]
        raise ckpt.CheckpointError(
            f"--resume auto: no readable checkpoint in {self.path}; unreadable, now in {folder}/: "
            + "; ".join(listed) + ". Nothing else was changed. Start over with --overwrite (moves the run to "
            f"{self.path}.old-<time>), keep it and start elsewhere with a new train.out_dir, or resume a good copy "
            "with --resume FILE")


# ------------------------------------------------------------------------------------------------ the claim


def _resume_source(path: str, resume: str) -> str | None:
    """None (fresh run), 'auto' (continue the run in ``path``) or the checkpoint file to start from."""
    if not resume:
        return None
    if resume == "auto" or (os.path.isdir(resume) and os.path.isdir(path) and os.path.samefile(resume, path)):
        return "auto"
    return ckpt.resolve_checkpoint(resume)


def claim(path: str, resume: str = "", overwrite: bool = False,
          log: Log = _log) -> tuple[RunDir, tuple[str, dict[str, Any] | None] | None]:
    """Claim ``path`` for this start (see the module docstring); returns the run and what to resume from:
    None, or (checkpoint path, its loaded state or None)."""
    check_out_dir(path)
    if overwrite:
        move_aside(path, log)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise _os_error(path, e) from None
    remove_stale(path, _STALE, log)
    source = _resume_source(path, resume)
    if source == "auto":
        run = RunDir.adopt(path, log)
        return run, run.select_resume()
    if source is not None and os.path.samefile(os.path.dirname(os.path.abspath(source)), path):
        return RunDir.adopt(path, log), (source, None)
    if holds_results(path):
        raise RunDirError(f"train.out_dir {path} already holds a run ({describe(path)}); a fresh run there would "
                          f"overwrite its log and mix checkpoints. Choose: " + _CHOICES.format(path=path))
    return RunDir.create(path, started_from=source, log=log), (None if source is None else (source, None))


def claim_on_main(path: str, resume: str, overwrite: bool) -> tuple[RunDir | None, str | None, dict | None]:
    """:func:`claim` on rank 0, its outcome shared with every rank: (run on rank 0 else None, resume path, the
    loaded state on rank 0 when it was already read). An error is raised on every rank alike."""
    run, found, error = None, None, None
    if dist.is_main():
        try:
            run, found = claim(path, resume, overwrite)
        except (ConfigError, ckpt.CheckpointError) as e:
            error = (type(e).__name__, str(e))
    shared = dist.broadcast_object((error, found[0] if found else None))
    if shared[0] is not None:
        kind, msg = shared[0]
        raise (ckpt.CheckpointError if kind == "CheckpointError" else RunDirError)(msg)
    return run, shared[1], (found[1] if found else None)
