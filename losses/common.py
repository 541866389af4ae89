"""Shared numerics helpers for losses."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp32_island(device_type: str):
    """Disable autocast inside: the caller then casts its inputs with ``.float()`` so the math runs in fp32."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or unchanged if it is already fp32/fp64 (so float64 reference tests stay in float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
