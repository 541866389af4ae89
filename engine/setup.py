"""Device choice, seeding, autocast and the device-augmentation builder shared by train.py, eval.py and benchmarks."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from engine.config import Config
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


# Speed of bf16 autocast over fp32 for the DINO demo step (ResNet-18, B 64, channels-last) on one CPU, by the best ISA
# oneDNN was allowed (ONEDNN_MAX_CPU_ISA; python -m benchmarks.fast_step --variant ...): AMX 1.50x, AVX512-BF16
# 1.12x, AVX512 0.48x, AVX2 0.10x (docs/performance.md, "Precision"). Only AMX gives a clear gain; without AVX512-BF16,
# bf16 is emulated and costs 2-10x. At AVX512-BF16's break-even, auto keeps fp32 (exact, reproducible numerics).
def cpu_bf16_is_fast() -> bool:
    """True when oneDNN may run bf16 matmuls/convolutions on AMX tiles on this CPU (``ONEDNN_MAX_CPU_ISA`` honoured)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent means unknown -> no
    return bool(amx is not None and amx())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``model.precision`` as the run uses it: 'auto' -> bf16 on CUDA with bf16 support (else fp16), bf16 on CPUs with
    AMX, fp32 on other CPUs. An explicit choice is kept; bf16 on a CPU without AMX is kept with a warning."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_is_fast():
        log("[setup] WARNING: model.precision=bf16 on a CPU without AMX: bf16 autocast measured at most 1.1x faster "
            "(AVX512-BF16) and up to 10x slower (AVX2) than fp32 there; model.precision=auto picks fp32")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 autocast dtype, or None for fp32. fp16 autocast is CUDA-only here: CPU falls back to bf16."""
    if precision == "auto":
        precision = resolve_precision(precision, device)
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
    from pipeline.augment.gpu_augment import DeviceAugment
    from runtime import dist

    if cfg.model.precision == "fp16" and device.type != "cuda":
        log("[setup] fp16 autocast is CUDA-only; using bf16 on CPU")
    return DeviceAugment(cfg.data.expanded_views(), mean=cfg.data.mean, std=cfg.data.std,
                         out_dtype=autocast_dtype(cfg.model.precision, device) or torch.float32,
                         channels_last=cfg.model.channels_last, seed=cfg.train.seed * 1000 + dist.rank(),
                         flip=cfg.data.loader != "torchvision",  # the PIL path flips already
                         compile=cfg.model.compile,  # model.compile also compiles the elementwise augmentation
                         impl=cfg.data.augment)
