"""[0] The conversion manifest: when an existing output counts as up to date, ``--verify``, and stale temporaries.

``manifest.json`` (written last, see :mod:`pipeline.convert.build`) holds the settings, the source listing's fingerprint
(relative path, size, mtime and label of every source file, :func:`pipeline.convert.scan.scan_image_folder`) and, per
output file, ``{"size": bytes, "blake2b": hex}``: a 128-bit BLAKE2b digest of the whole file, streamed in blocks
(stdlib ``hashlib``; a check reads every output file once). An output is *current* only if settings and
fingerprint match and every file has its recorded size and digest, so a file corrupted in place (same size) is
rebuilt instead of being reported "up to date". Manifests written before digests existed count as stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

from runtime.procs import remove_stale

# ffcv's writer puts its per-sample metadata table in POSIX shared memory; write_ffcv names it with this
# prefix and the writer's pid (Python's default names, psm_<hex>, carry no owner, so they cannot be cleaned safely)
SHM_DIR = "/dev/shm"
SHM_PREFIX = "flashssl-ffcv-"
_SHM_STALE = re.compile(rf"^{re.escape(SHM_PREFIX)}(?P<pid>\d+)-[0-9a-f]+$")


def file_digest(path: str) -> str:
    """BLAKE2b-128 hex digest of the file at ``path`` (streamed; constant memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def file_entry(path: str) -> dict:
    """The manifest's record of one output file."""
    return {"size": os.path.getsize(path), "blake2b": file_digest(path)}


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def file_problems(manifest: dict, manifest_path: str) -> list[str]:
    """'<path>: <what is wrong>' for every file the manifest lists that is missing or differs from its record."""
    files = manifest.get("files")
    if not files or not isinstance(files, dict):
        return [f"{manifest_path}: the manifest lists no files"]
    if not all(isinstance(e, dict) and "blake2b" in e for e in files.values()):
        return [f"{manifest_path}: written by an older version, without content checksums"]
    base, problems = os.path.dirname(manifest_path), []
    for name, entry in sorted(files.items()):
        path = os.path.join(base, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != entry.get("size"):
            problems.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {entry.get('size')}")
        elif file_digest(path) != entry["blake2b"]:
            problems.append(f"{path}: content differs from the manifest's checksum (modified or corrupted on disk)")
    return problems


def output_state(path: str, manifest_path: str, settings: dict, fingerprint: str) -> tuple[str, str]:
    """(state, reason): 'missing' | 'current' | 'foreign' (something at ``path`` without our manifest) | 'stale'
    (our manifest, but settings or source changed, or a file is missing or differs; ``reason`` names the path and
    says which)."""
    manifest = read_json(manifest_path)
    if manifest is None:
        return ("foreign", "no manifest") if os.path.exists(path) else ("missing", "")
    if manifest.get("settings") != settings:
        return "stale", f"{path}: settings changed since it was written"
    if manifest.get("source_fingerprint") != fingerprint:
        return "stale", f"{path}: the source files changed since it was written"
    if not os.path.exists(path):
        return "stale", f"{path} is missing"
    problems = file_problems(manifest, manifest_path)
    return ("stale", problems[0]) if problems else ("current", "")


def verify_output(path: str, manifest_path: str) -> list[str]:
    """Problems of an existing output against its manifest (empty = every file has its recorded checksum)."""
    manifest = read_json(manifest_path)
    if manifest is None:
        return [f"{path}: no readable manifest {manifest_path} (not a complete convert_dataset.py output)"]
    return file_problems(manifest, manifest_path)


def remove_stale_temps(folder: str, stem: str, log: Callable[[str], None] | None) -> list[str]:
    """Remove temporaries killed conversions left in ``folder`` (``.<stem>.[...].tmp|old|spool-<pid>`` of dead pids)
    and ffcv writer shared memory in /dev/shm whose writer is dead; each removal is reported through ``log``."""
    pattern = re.compile(rf"^\.{re.escape(stem)}\.(.*\.)?(tmp|old|spool)-(?P<pid>\d+)$")
    return remove_stale(folder, pattern, log) + remove_stale(SHM_DIR, _SHM_STALE, log, "ffcv shared memory")
