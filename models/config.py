"""Typed configuration of the backbone and its precision/compile/parallel options (``model:``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtime.config_loader import (
    bounded,
)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm name; resnet50 / vit_small_patch16_224 for the ImageNet recipes
    # stem of a ResNet: "imagenet" (timm's 7x7/2 conv + 3x3/2 max-pool) or "cifar" (a 3x3/1 conv, no pooling: the
    # stem of the small-image codes the *_small recipes follow; 16x the stem-and-body compute at the same input size)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)  # stochastic depth (ViT: 0.1 is DINO's recommendation)
    # autocast dtype; fp16 adds a GradScaler (CUDA only). auto: bf16 on CUDA (fp16 without bf16 support) and on CPUs
    # with AMX, fp32 on other CPUs (bf16 is slower than fp32 there); the run's config.yaml records the resolved value
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC memory format: faster convolutions on GPUs with tensor cores and on CPU oneDNN
    compile: bool = False  # torch.compile the backbone; warm-up cost is paid once per resolution
    sync_bn: bool = True  # convert BN to SyncBatchNorm when world_size > 1 (the SCFS/DINO-ResNet recipes)
