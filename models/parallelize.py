"""Applied once after construction: SyncBatchNorm, channels-last, torch.compile and DDP. Model code has none of it."""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from runtime import dist
from runtime.logging import log


def parallelize(method: nn.Module, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Move ``method`` to ``device`` and wrap it; returns the module the trainer calls (DDP or the method itself).

    - SyncBN only with >1 rank on CUDA (gloo has no SyncBN kernels on CPU; per-rank BN is used there and logged).
    - The teacher is inside the wrapped module but has ``requires_grad=False``, so DDP neither reduces nor waits on it.
      ``forward_sync_buffers=False``: loss state (centers, queues) is kept identical by the methods' own all-reduces,
      and BN statistics are SyncBN's job; broadcasting them every step would be a wasted collective.
    """
    if cfg.sync_bn and dist.world_size() > 1:
        if device.type == "cuda":
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:
            log("[parallelize] SyncBatchNorm needs CUDA; using per-rank BatchNorm on CPU")
    method = method.to(device)
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.compile:
        for net in (getattr(method, "student", None), getattr(method, "teacher", None)):
            if net is None or not hasattr(net, "backbone"):
                continue
            if hasattr(net, "compile_backbone"):  # nets that call the backbone through another entry point (SCFS)
                net.compile_backbone()
            else:
                net.backbone.compile(dynamic=False)  # one graph per crop resolution; warm-up reported by --benchmark
    if dist.world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(method, device_ids=ids, forward_sync_buffers=False)
    return method


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
