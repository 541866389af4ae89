"""MV-MR (Kinakh et al., Entropy 2024): one encoder, an un-augmented and an augmented view, distance correlation with
hand-crafted representations of the un-augmented view -- or, in the distillation variant, with a frozen teacher.

Reference: vkinakh/mv-mr @ 7136f70 (``src/model/self_supervised_module.py``,
``src/model/clip_self_supervised_module.py``, ``src/model/resnet.py``); notes ``docs/methods/mvmr.md``.

Views (``data.views``, two globals, no locals): view ``ssl.original_view`` (default 0) is the *original* image --
a RandomResizedCrop with scale (1, 1) and ratio (1, 1) and no other op, i.e. the whole (square) image resized to the
view size (the official STL10 ``ValTransform``; on non-square images the centre square, where the official ImageNet
``ValTransform`` is Resize 256 -> CenterCrop 224); the other view is the augmented one. Both go through the same
trainable encoder, each in its own forward pass (own BatchNorm statistics), augmented view first, as the official
``step``. Everything is per rank: nothing is gathered, BatchNorm is not synchronised (the official code runs Lightning
DDP without SyncBN and computes every term, dCor included, on the per-GPU batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from losses.common import fp32_island
from losses.mvmr import DCorTarget, MVMRLoss
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.frozen_teacher import FrozenTeacher, FrozenTeacherConfig, build_teacher_net
from models.handcrafted import CODE_SCALE, HandcraftedRepresentations
from models.heads import MLPConfig, build_mlp
from models.residual_init import set_zero_init_residual
from models.ssl_net import BackboneWithHead
from runtime.config_loader import ConfigError, bounded


@dataclass
class MVMRConfig:
    # bias-free projector Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, 8192 wide in every official config
    proj_hidden_dim: int = bounded(8192, ge=1)
    proj_out_dim: int = bounded(8192, ge=1)
    proj_layers: int = bounded(3, ge=1)
    std_margin: float = bounded(1.0, gt=0)  # target per-dimension std of z (hinge, unbiased std, no eps)
    # dCor clamp of squared pairwise distances, in the units of the official code's scaled tensors (z / 32 ...);
    # converted to each tensor's own units, so no tensor is rescaled (the /32 was an fp16 trick; we run dCor in fp32)
    dcor_clamp: float = bounded(1.0e-4, gt=0)
    z_scale: float = bounded(32.0, gt=0)  # the official divisor of z before dCor (only enters through the clamp)
    # hand-crafted representations of the original view compared with z_a; [] for the distillation variant
    representations: list[str] = field(default_factory=lambda: list(CODE_SCALE))
    # 'code': +dCor(psi, z_a) is *added* (the released code: dependence is reduced); 'paper': 1 - dCor (maximised)
    handcrafted_sign: Literal["code", "paper"] = "code"
    zero_init_residual: bool = True  # the official torchvision resnet50(zero_init_residual=True)
    # index in data.expanded_views() of the un-augmented view; the other one is augmented
    original_view: int = bounded(0, choices=(0, 1))
    scat_j: int = bounded(2, ge=1)  # kymatio Scattering2D scales J
    scat_l: int = bounded(8, ge=1)  # and orientations L -> 1 + J L + L^2 J (J - 1) / 2 = 81 channels per colour
    hog_bins: int = bounded(24, ge=1)
    hog_pool: int = bounded(8, ge=1)
    std_kernel: int = bounded(3, ge=2)
    teacher: FrozenTeacherConfig = field(default_factory=FrozenTeacherConfig)  # distillation variant (1 - dCor)

    def __post_init__(self) -> None:
        for r in self.representations:
            if r not in CODE_SCALE:
                raise ConfigError(f"ssl.representations: unknown representation {r!r}; allowed values: "
                                  f"{', '.join(CODE_SCALE)}")
        if len(set(self.representations)) != len(self.representations):
            raise ConfigError(f"ssl.representations: duplicates in {self.representations}")


def build_mvmr_student(cfg) -> BackboneWithHead:
    """timm backbone + MV-MR's bias-free BN/ReLU projector (no normalisation at the output)."""
    backbone = build_backbone(cfg.model)
    s = cfg.ssl
    set_zero_init_residual(backbone, s.zero_init_residual)
    head = build_mlp(feature_dim(backbone), MLPConfig(hidden_dim=s.proj_hidden_dim, out_dim=s.proj_out_dim,
                                                      layers=s.proj_layers, norm="bn", act="relu", bias=False))
    return BackboneWithHead(backbone, head)


def unaugmented_problems(view) -> list[str]:
    """Why a ViewConfig is not MV-MR's un-augmented view (empty list if it is)."""
    problems = [f"{k}={getattr(view, k)}" for k in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
                if getattr(view, k) != 0]
    problems += [f"{k}={list(getattr(view, k))}" for k in ("scale", "ratio") if tuple(getattr(view, k)) != (1.0, 1.0)]
    return problems


@register_method("mvmr")
class MVMR(SSLMethod):
    Config = MVMRConfig
    eval_weights = "student"  # one encoder, no EMA; the official probe reads h of the student
    eval_protocol = "mvmr"  # MV-MR --retrain

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.ssl
        s = cfg.ssl
        self.student = build_mvmr_student(cfg)
        self.teacher = None  # no EMA teacher: the base after_step does nothing
        self.handcrafted = HandcraftedRepresentations(s.representations, s.scat_j, s.scat_l, s.hog_bins, s.hog_pool,
                                                      s.std_kernel, seed=cfg.train.seed)
        self.frozen_teacher = None
        if s.teacher.kind != "none":
            self.frozen_teacher = FrozenTeacher(build_teacher_net(s.teacher), s.teacher.input_size)
        self.loss = MVMRLoss(s.std_margin, s.dcor_clamp * s.z_scale**2)

    def targets(self, x_o: torch.Tensor, step: int) -> dict[str, DCorTarget]:
        """The representations of the original view ``x_o`` (B, 3, H, W) that ``z_a`` is compared with."""
        s = self.cfg
        with fp32_island(x_o.device.type):
            reps = self.handcrafted(x_o, step)
        out = {name: DCorTarget(f, s.dcor_clamp * CODE_SCALE[name] ** 2, maximise=s.handcrafted_sign == "paper")
               for name, f in reps.items()}
        if self.frozen_teacher is not None:
            # the teacher runs under the ambient autocast (official: fp16); its features enter dCor in fp32
            out["teacher"] = DCorTarget(self.frozen_teacher(x_o), s.dcor_clamp * s.teacher.scale**2, maximise=True)
        return out

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        """views: [x_o, x_a] (or [x_a, x_o] with ``original_view: 1``), each (B, 3, H, W) normalised."""
        if len(views) != 2:
            raise ValueError(f"MV-MR takes exactly 2 views (original, augmented), got {len(views)}")
        x_o, x_a = views[self.cfg.original_view], views[1 - self.cfg.original_view]
        z_a = self.student.embed([x_a])[1][0]  # (B, D); separate passes = separate BN batches, as official
        z_o = self.student.embed([x_o])[1][0]
        loss, logs = self.loss(z_o, z_a, self.targets(x_o, ctx.step))
        return StepOutput(loss, logs, {})

    @classmethod
    def check_config(cls, cfg) -> None:
        views = cfg.data.expanded_views()
        if len(views) != 2 or cfg.data.n_local != 0:
            raise ConfigError(f"data.views: MV-MR needs exactly 2 global views (original + augmented), got "
                              f"{cfg.data.n_global} global and {cfg.data.n_local} local")
        i = cfg.ssl.original_view
        problems = unaugmented_problems(views[i])
        if problems:
            raise ConfigError(f"data.views: view {i} is MV-MR's original view (ssl.original_view={i}) and must be "
                              f"un-augmented (scale/ratio [1, 1], every probability 0); got {', '.join(problems)}")
        size = views[i].size
        if cfg.ssl.hog_pool > size or 2**cfg.ssl.scat_j > size:
            raise ConfigError(f"ssl.hog_pool / ssl.scat_j: too coarse for the {size} px original view")
        if cfg.data.batch_size < 2:
            raise ConfigError(f"data.batch_size: MV-MR's std and dCor terms need >= 2 samples per rank, got "
                              f"{cfg.data.batch_size}")
