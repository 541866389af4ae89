"""Device choice, seeding, autocast and the device-augmentation builder shared by train.py, eval.py and benchmarks."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from runtime.config import Config
from runtime.config_loader import ConfigError
from runtime.logging import log


def pick_device(choice: str) -> torch.device:
    """'auto' -> cuda:<local_rank> when available, else cpu."""
    from runtime import dist

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is visible; use train.device=cpu")
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 autocast dtype, or None for fp32. fp16 autocast is CUDA-only here: CPU falls back to bf16."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_ctx(precision: str, device: torch.device):
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_augment(cfg: Config, device: torch.device):
    """The batched device augmentation for loaders that deliver uint8 crops (None if the loader augments itself)."""
    if cfg.data.loader == "torchvision" and not cfg.data.device_augment:
        return None
    from pipeline.gpu_augment import DeviceAugment
    from runtime import dist

    if cfg.model.precision == "fp16" and device.type != "cuda":
        log("[setup] fp16 autocast is CUDA-only; using bf16 on CPU")
    return DeviceAugment(cfg.data.expanded_views(), mean=cfg.data.mean, std=cfg.data.std,
                         out_dtype=autocast_dtype(cfg.model.precision, device) or torch.float32,
                         channels_last=cfg.model.channels_last, seed=cfg.train.seed * 1000 + dist.rank(),
                         flip=cfg.data.loader != "torchvision",  # the PIL path flips already
                         compile=cfg.model.compile)  # model.compile also compiles the elementwise augmentation
