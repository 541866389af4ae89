"""On-disk cache of frozen features, keyed on everything that determines them.

The key is a SHA-256 over: the checkpoint's fingerprint (resolved path, size, mtime and a hash of its first and last
MiB: cheap even for GB files, and any re-save changes it), which weights are evaluated, the data fingerprint (a
``.beton``: the same file fingerprint; an ImageFolder: every image's relative path, size and mtime), the transform
(crop/resize sides, augmented copies, seed) and the feature precision. A changed checkpoint or dataset therefore
gets a new cache file; stale files are never read. Files are written by rank 0 with
:func:`runtime.checkpoint.atomic_save` (temp file + fsync + rename), so a killed job leaves no half-written cache,
and the stored key is checked again on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch

from runtime import dist
from runtime.checkpoint import atomic_save
from runtime.logging import log

_EDGE = 1 << 20  # bytes hashed at each end of a file


def file_fingerprint(path: str) -> dict:
    """Resolved path, size, mtime and a SHA-256 of the first and last MiB of a file."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > 2 * _EDGE:
            f.seek(-_EDGE, os.SEEK_END)
            h.update(f.read(_EDGE))
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def folder_fingerprint(root: str) -> dict:
    """Resolved path and a SHA-256 over (relative path, size, mtime) of every file below ``root``, sorted."""
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return {"path": os.path.realpath(root), "files": count, "listing": h.hexdigest()}


def data_fingerprint(path: str) -> dict:
    return folder_fingerprint(path) if os.path.isdir(path) else file_fingerprint(path)


def cache_key(parts: dict) -> str:
    """Stable hex key of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """``get_or_compute(name, parts, fn, device, data_path)``: tensors ``fn()`` computed once per distinct key.

    The key is ``base`` (checkpoint fingerprint, weights, transform, precision: set by the caller) + ``parts`` + the
    fingerprint of ``data_path``. ``directory=None`` disables caching (``fn`` always runs, nothing is fingerprinted).
    ``fn`` runs on every rank (feature extraction is itself distributed) and must return the same dict of tensors on
    every rank; rank 0 writes the file.
    """

    def __init__(self, directory: str | None, dtype: torch.dtype = torch.float32, base: dict | None = None):
        self.directory, self.dtype, self.base = directory, dtype, dict(base or {})
        self.hits: list[str] = []
        self._fingerprints: dict[str, dict] = {}

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, name: str, key: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{name}-{key[:20]}.pt")

    def key(self, parts: dict, data_path: str | None) -> str:
        full = {**self.base, **parts, "dtype": str(self.dtype)}
        if data_path is not None:
            if data_path not in self._fingerprints:
                self._fingerprints[data_path] = data_fingerprint(data_path)
            full["data"] = self._fingerprints[data_path]
        return cache_key(full)

    def get_or_compute(self, name: str, parts: dict, fn: Callable[[], dict[str, torch.Tensor]],
                       device: torch.device, data_path: str | None = None) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return fn()
        key = self.key(parts, data_path)
        path = self.path(name, key)
        found = self._load(path, key)
        # fn() has collectives: every rank must take the same branch (a node-local cache dir may differ per node)
        hits = torch.tensor([float(found is not None)], device=device)
        dist.all_reduce_sum(hits)
        if found is not None and hits.item() < dist.world_size():
            found = None
        if found is not None:
            self.hits.append(path)
            log(f"[cache] {name}: reusing {path}")
            return {k: v.to(device) for k, v in found.items()}
        out = fn()
        if dist.is_main():
            stored = {k: (v.to(self.dtype) if v.is_floating_point() else v).cpu() for k, v in out.items()}
            atomic_save({"key": key, "name": name, "tensors": stored}, path)
            log(f"[cache] {name}: wrote {path}")
        dist.barrier()
        # the returned tensors are the ones a later cache hit gives back (same dtype rounding)
        return {k: (v.to(self.dtype).float() if v.is_floating_point() else v) for k, v in out.items()}

    @staticmethod
    def _load(path: str, key: str) -> dict[str, torch.Tensor] | None:
        if not os.path.isfile(path):
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated/corrupt: recompute and overwrite
            log(f"[cache] ignoring unreadable {path}: {type(e).__name__}: {e}")
            return None
        if not isinstance(obj, dict) or obj.get("key") != key or not isinstance(obj.get("tensors"), dict):
            log(f"[cache] ignoring {path}: its key does not match (different checkpoint, data or settings)")
            return None
        return {k: (v.float() if v.is_floating_point() else v) for k, v in obj["tensors"].items()}
