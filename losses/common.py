"""Shared numerics helpers for losses."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fp32_island(device_type: str):
    """Disable autocast inside: the caller then casts its inputs with ``.float()`` so the math runs in fp32."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield
