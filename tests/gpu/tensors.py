"""Map a function over the tensors inside nested tuples / lists / dicts / dataclasses (loss inputs of
``benchmarks.kernels``: ReSA tuples, CW-RGP partitions, MV-MR ``DCorTarget`` dicts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def as_float64(obj):
    """Floating tensors -> float64 (integer index tensors unchanged)."""
    return map_tensors(obj, lambda t: t.double() if t.is_floating_point() else t)
