"""Atomic file writes: write under a temporary name next to the target, then rename it into place.

``os.replace`` within one folder is atomic on POSIX filesystems, so a reader sees the old file or the complete new
one, never a truncated file from a writer that was killed or failed half way. The temporary name carries the
writer's pid (``.<name>.tmp-<pid>`` by default), so that a later start can tell a dead writer's leftover from a live
one (:func:`runtime.procs.remove_stale`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str, tmp: str | None = None) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s new content to; on success it is renamed onto ``path``.

    Creates ``path``'s folder. The temporary file is removed when the block raises. ``tmp`` names the temporary
    file where a caller's stale-file cleanup depends on the name (default ``.<basename>.tmp-<pid>`` beside ``path``).
    Callers that need durability across a power loss ``fsync`` the file they write inside the block.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = tmp or os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
