"""Typed configuration tree.

Merge order (fixed): dataclass defaults <- ``configs/method/<method>.yaml`` <- each ``--config`` YAML in order
<- CLI ``key=value`` overrides. The method-specific ``ssl`` section is typed by the selected method's own
``Config`` dataclass (see ``methods/``). Field comments say *why* and give recommended values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.config_loader import ConfigError, coerce, deep_merge, from_dict, load_yaml, parse_override, to_dict

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class ViewConfig:
    """One entry of the multi-crop recipe; expands to ``count`` crops with the same recipe.

    Globals must come before locals. Colour jitter strengths follow torchvision's ColorJitter semantics.
    """

    role: Literal["global", "local"] = "global"
    count: int = 1
    size: int = 224  # output side in pixels (224 global, 96 local for DINO-style multi-crop)
    scale: tuple[float, float] = (0.25, 1.0)  # area fraction range of RandomResizedCrop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range (log-uniform), as torchvision
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    # Blur kernel length in output pixels; 0 = 2*ceil(3*blur_sigma[1])+1 (13 taps for sigma<=2). sigma is in output
    # pixels for every crop size, as in DINO (PIL GaussianBlur(radius=sigma) on the resized crop).
    blur_kernel: int = 0
    # Device colour jitter: "exact" (default) = torchvision float semantics (clamp after each op, HSV hue);
    # "fused" = one per-sample affine colour map (hue as a rotation about the grey axis): ~1.7x cheaper than the torch
    # ops of "exact" (on CPU batches cpu_impl="kernel" makes "exact" nearly as cheap: 0.12 vs 0.09 s per DINO batch) but
    # mean |diff| 7.6/255 vs torchvision with hue 0.1 (see pipeline/augment_ops.py jitter_matrices). Only used by the
    # device augmentation (pipeline/gpu_augment.py), not by the PIL path. The blur kernel rule above applies to both.
    jitter_impl: Literal["exact", "fused"] = "exact"
    # Device augmentation of CPU batches: "kernel" = numba kernels for the exact colour stage and the blur
    # (pipeline/color_kernel.py, pipeline/blur_ops.py: same results to float32 rounding, ~10x cheaper); "torch" = the
    # torch ops (the reference; what other devices always run).
    cpu_impl: Literal["kernel", "torch"] = "kernel"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"views[].count: must be >= 1, got {self.count}")
        if self.size < 8:
            raise ConfigError(f"views[].size: must be >= 8 pixels, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"views[].scale: need 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"views[].ratio: need 0 < min <= max, got {self.ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"views[].{name}: probability must be in [0, 1], got {p}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"views[].hue: must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel != 0 and (self.blur_kernel < 3 or self.blur_kernel % 2 == 0):
            raise ConfigError(f"views[].blur_kernel: must be 0 (auto) or an odd number >= 3, got {self.blur_kernel}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"views[].blur_sigma: need 0 < min <= max, got {self.blur_sigma}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"views[].{name}: must be >= 0, got {getattr(self, name)}")


def dino_views(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), n_local=8, local_size=96) -> list[ViewConfig]:
    """DINO multi-crop: g1 always blurred, g2 blur 0.1 + solarize 0.2, locals blur 0.5."""
    return [
        ViewConfig("global", 1, 224, global_scale, blur_p=1.0),
        ViewConfig("global", 1, 224, global_scale, blur_p=0.1, solarize_p=0.2),
        ViewConfig("local", n_local, local_size, local_scale, blur_p=0.5),
    ]


@dataclass
class DataConfig:
    loader: Literal["torchvision", "ffcv", "dali"] = "torchvision"
    # torchvision: ImageFolder directory; ffcv: .beton file; dali: shard directory written by convert_dataset.py
    train_path: str = "data/demo/train"
    batch_size: int = 64  # per rank; the global batch is batch_size * world_size
    workers: int = 2  # loader worker processes/threads per rank; use every core not driving the accelerator
    views: list[ViewConfig] = field(default_factory=dino_views)
    # torchvision loader only: False = the official repos' way (every op in PIL per image in workers);
    # True = PIL does decode+crop+flip, colour/blur/solarize run batched on the device (much faster).
    device_augment: bool = True
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resize kernel of RandomResizedCrop (DINO: bicubic)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    os_cache: bool = True  # ffcv: read through the page cache (True when the dataset fits in RAM)
    order: Literal["random", "quasi_random"] = "random"  # ffcv sample order; quasi_random needs less RAM
    # kNN / probe center-crop side (images are resized to eval_size * 256/224 first). 0 = the first global view's
    # size: evaluate at the resolution the backbone was trained at (224 for the ImageNet recipes).
    eval_size: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        if not self.views:
            raise ConfigError("data.views: at least one view is required")
        roles = [v.role for v in self.views]
        if "global" not in roles:
            raise ConfigError("data.views: at least one view must have role 'global'")
        if roles != sorted(roles, key=lambda r: r != "global"):
            raise ConfigError(f"data.views: global views must come before local views, got roles {roles}")
        if self.eval_size == 0:
            self.eval_size = self.views[0].size

    @property
    def n_global(self) -> int:
        return sum(v.count for v in self.views if v.role == "global")

    @property
    def n_local(self) -> int:
        return sum(v.count for v in self.views if v.role == "local")

    def expanded_views(self) -> list[ViewConfig]:
        """One ViewConfig per crop (``count`` expanded), globals first."""
        return [dataclasses.replace(v, count=1) for v in self.views for _ in range(v.count)]


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm name; resnet50 / vit_small_patch16_224 for the ImageNet recipes
    drop_path_rate: float = 0.0  # stochastic depth (ViT: 0.1 is DINO's recommendation)
    # autocast dtype; fp16 adds a GradScaler (CUDA only). auto: bf16 on CUDA (fp16 without bf16 support) and on CPUs
    # with AMX, fp32 on other CPUs (bf16 is slower than fp32 there); the run's config.yaml records the resolved value
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True  # NHWC memory format: faster convolutions on GPUs with tensor cores and on CPU oneDNN
    compile: bool = False  # torch.compile the backbone; warm-up cost is paid once per resolution
    sync_bn: bool = True  # convert BN to SyncBatchNorm when world_size > 1 (the SCFS/DINO-ResNet recipes)

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars", "adamw", "adam"] = "sgd"  # adam = torch Adam, weight decay as L2 in the gradient
    lr: float = 0.1  # base lr for a global batch of 256; the used lr is scaled by lr_scaling
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    min_lr: float = 0.0048  # final lr of the cosine (absolute, not scaled)
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak lr
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine schedule of wd to this value; None = constant
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # 0 disables clipping
    clip_mode: Literal["per_param", "global"] = "per_param"  # DINO/SCFS clip each tensor to the norm separately
    freeze_last_layer_epochs: int = 1  # DINO: no gradient to the prototype layer during the first epoch(s)
    lars_eta: float = 0.001
    fused: bool = True  # fused/foreach optimizer implementation where torch offers it

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad: must be >= 0 (0 disables), got {self.clip_grad}")


@dataclass
class TrainConfig:
    epochs: int = 100
    steps_per_epoch: int = 0  # 0 = one pass over the data; >0 caps an epoch (demo, smoke tests)
    out_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 10  # steps between host syncs for loss logging (each .item() is a sync)
    ckpt_every: int = 200  # steps between checkpoints (and always at the end of an epoch)
    keep_last: int = 3  # checkpoints kept on disk
    resume: str = ""  # '' = fresh run, 'auto' = newest valid checkpoint in out_dir, or a path
    knn_at_end: bool = True  # run weighted kNN on data.val_path after training
    tensorboard: bool = True
    # Collapse guard (runtime/collapse.py), checked at log steps: a criterion that holds for collapse_patience
    # consecutive log steps prints one warning naming the collapse and its usual fixes and writes an event row to
    # metrics.jsonl. stop_on_collapse=true then stops the run (train.py exits with code 2), and while a criterion is
    # holding no checkpoint is written, so the newest one on disk predates the collapse. A threshold of 0 switches
    # its criterion off. Teacher entropies are fractions of log K (teacher-student methods only).
    collapse_patience: int = 3  # >= 1
    stop_on_collapse: bool = False
    collapse_uniform_entropy: float = 0.97  # uniform collapse: mean per-sample teacher entropy >= this, in (0, 1]
    collapse_onehot_entropy: float = 0.05  # one-hot collapse: entropy of the batch-mean teacher output <= this, [0, 1)
    collapse_min_rank: float = 2.0  # dimensional collapse: effective rank of the batch features <= this (>= 0)
    collapse_min_std_ratio: float = 0.02  # constant output: per-dim std of unit features x sqrt(D) <= this, [0, 1)

    def __post_init__(self) -> None:
        if self.collapse_patience < 1:
            raise ConfigError(f"train.collapse_patience: must be >= 1 log step, got {self.collapse_patience}")
        if not 0 <= self.collapse_uniform_entropy <= 1:
            raise ConfigError("train.collapse_uniform_entropy: a fraction of log K in (0, 1] (0 = off), got "
                              f"{self.collapse_uniform_entropy}")
        for name in ("collapse_onehot_entropy", "collapse_min_std_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be in [0, 1) (0 = off), got {getattr(self, name)}")
        if self.collapse_min_rank < 0:
            raise ConfigError(f"train.collapse_min_rank: must be >= 0 (0 = off), got {self.collapse_min_rank}")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs: must be >= 1, got {self.epochs}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last: must be >= 1, got {self.keep_last}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every: must be >= 1, got {self.log_every}")


@dataclass
class EvalConfig:
    # labelled ImageFolder splits for kNN (at the end of training and in eval.py knn)
    train_dir: str = "data/demo/train"
    val_dir: str = "data/demo/val"
    knn_k: int = 20
    knn_t: float = 0.07
    batch_size: int = 128
    features: Literal["teacher", "student", "auto"] = "auto"  # auto = the method's official choice


@dataclass
class Config:
    method: str = "dino"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: Any = None  # the selected method's Config dataclass instance


def load_config(method: str, config_files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the full config for ``method``; raises ConfigError before any work starts."""
    from methods import METHODS  # local import: methods import runtime, not the other way round

    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; allowed values: {', '.join(sorted(METHODS))}")
    merged: dict = {"method": method}
    method_yaml = os.path.join(CONFIG_DIR, "method", f"{method}.yaml")
    layers = [method_yaml] if os.path.exists(method_yaml) else []
    for path in layers + list(config_files or []):
        merged = deep_merge(merged, load_yaml(path))
    for item in overrides or []:
        merged = deep_merge(merged, parse_override(item))
    if merged.get("method", method) != method:
        raise ConfigError(f"method: the config says {merged['method']!r} but --method is {method!r}")
    ssl_raw = merged.pop("ssl", {}) or {}
    cfg = from_dict(Config, merged)
    cfg.ssl = coerce(METHODS[method].Config, ssl_raw, "ssl")
    METHODS[method].check_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return to_dict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by :func:`config_to_dict` (e.g. from a checkpoint)."""
    from methods import METHODS

    data = dict(data)
    ssl_raw = data.pop("ssl", {}) or {}
    cfg = from_dict(Config, data)
    cfg.ssl = coerce(METHODS.get_or_raise(cfg.method).Config, ssl_raw, "ssl")
    return cfg
