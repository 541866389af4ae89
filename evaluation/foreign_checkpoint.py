"""Reading checkpoints written by other code bases (official SSL repositories), without running their code.

* :func:`load_foreign` loads a ``.pth`` / ``.ckpt`` with ``torch.load(weights_only=True)``. Files that pickle objects
  of classes the weights-only unpickler refuses (DINO stores an ``argparse.Namespace`` under ``args``; PyTorch
  Lightning stores ``AttributeDict`` hyper-parameters) are loaded by allow-listing each such class *name* as an
  inert stand-in (:class:`Opaque`): nothing from the file is executed, the tensors come back intact.
* :func:`state_dicts` lists the tensor mappings a checkpoint holds (the top level and the usual containers).
* :func:`describe` summarises a checkpoint (top-level keys, key prefixes with counts) for error messages.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from runtime.checkpoint import CheckpointError

#: containers the official repos nest their weights under (DINO/SCFS: teacher/student; Lightning, MoCo-style
#: scripts: state_dict; others: model)
CONTAINERS = ("teacher", "student", "state_dict", "model")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class Opaque:
    """Inert stand-in for a pickled object of a class that is not importable here (or not trusted).

    Accepts any constructor arguments and any pickled state and keeps them (``args``, ``state``); it never calls
    into the original class.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class OpaqueDict:
    """Stand-in for a ``dict`` subclass (Lightning's ``AttributeDict``): unpickles as a plain ``dict``."""

    def __new__(cls, *args: Any, **kwargs: Any) -> dict:  # type: ignore[misc]
        return dict()


def load_foreign(path: str, max_stubs: int = 32) -> Any:
    """``torch.load(path, weights_only=True)``, with unknown pickled classes replaced by inert stand-ins.

    Each unknown class named by the weights-only unpickler is allow-listed *by name* as :class:`Opaque` (or, if the
    pickle fills it like a dict, :class:`OpaqueDict`) and the load is retried. Raises CheckpointError naming the
    file when it is missing or not a torch checkpoint.
    """
    import os

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    stubs: dict[str, type] = {}
    for _ in range(2 * max_stubs + 1):
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in stubs.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - classify below, re-raise as CheckpointError
            msg = str(e)
            m = _UNSUPPORTED.search(msg)
            dict_like = [n for n, c in stubs.items() if c.__bases__ == (Opaque,) and f".{c.__name__}'>" in msg
                         and "SETITEM" in msg]
            if m is not None and m.group(1) not in stubs and len(stubs) < max_stubs:
                stubs[m.group(1)] = type(m.group(1).rsplit(".", 1)[-1], (Opaque,), {})
            elif dict_like:
                stubs[dict_like[0]] = type(stubs[dict_like[0]].__name__, (OpaqueDict,), {})
            else:
                first = next((line.strip() for line in msg.splitlines() if "error" in line.lower()), msg[:300])
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                                      f"{first[:300]})") from None
    raise CheckpointError(f"{path}: more than {max_stubs} unknown pickled classes; not a weights checkpoint?")


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def state_dicts(obj: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The tensor mappings in a loaded checkpoint: ``""`` for the top level, else the container key."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    if is_tensor_dict(obj):
        found[""] = obj
    if isinstance(obj, dict):
        for key in CONTAINERS:
            if is_tensor_dict(obj.get(key)):
                found[key] = obj[key]
    return found


def key_prefixes(keys, depth: int = 2, limit: int = 8) -> str:
    """'module.encoder_q. (320), queue (1)': the first ``depth`` dotted segments of the keys, most common first."""
    counts = Counter(".".join(k.split(".")[:depth]) + ("." if k.count(".") >= depth else "") for k in keys)
    return ", ".join(f"{p} ({n})" for p, n in counts.most_common(limit)) + (" ..." if len(counts) > limit else "")


def describe(obj: Any) -> str:
    """Top-level keys and, per tensor mapping, its key prefixes (for 'unknown layout' errors)."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict"
    top = ", ".join(map(str, list(obj)[:12])) + (" ..." if len(obj) > 12 else "")
    parts = [f"top-level keys: {top}"]
    for name, sd in state_dicts(obj).items():
        parts.append(f"{name or '<top level>'} holds {len(sd)} tensors with prefixes {key_prefixes(sd)}")
    if len(parts) == 1:
        parts.append(f"no tensor mapping at the top level or under {', '.join(CONTAINERS)}")
    return "; ".join(parts)
