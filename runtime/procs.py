"""Process helpers shared by the writers that clean up stale temporary outputs.

Every temporary file or folder this project writes carries the writer's pid in its name (``.ckpt_step*.pt.tmp.<pid>``,
``.<out>.tmp-<pid>``, ``flashssl-ffcv-<pid>-<hex>`` in ``/dev/shm``...). A process killed with SIGKILL cannot remove
them, so the next start removes the ones whose writer no longer exists (:func:`remove_stale`) and says so.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temp output whose writer is alive must not be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # not a pid this system can have
    return True


def remove_stale(folder: str, pattern: re.Pattern[str], log: Callable[[str], None] | None = None,
                 what: str = "temporary") -> list[str]:
    """Remove the entries of ``folder`` whose name matches ``pattern`` and whose writer pid (the group named ``pid``)
    is dead; returns their paths. Each removal is reported through ``log`` (``None``: silent)."""
    removed = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:  # missing or unreadable folder: nothing of ours to clean
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m or pid_alive(int(m.group("pid"))):
            continue
        full = os.path.join(folder, entry)
        try:
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        except OSError as e:
            if log:
                log(f"[cleanup] could not remove stale {what} {full}: {e.strerror}")
            continue
        removed.append(full)
        if log:
            log(f"[cleanup] removed stale {what} {full} (its writer, pid {m.group('pid')}, no longer runs)")
    return removed
