"""DINO (Caron et al. 2021): self-distillation with a centred, sharpened EMA teacher over multi-crop views.

Reference: facebookresearch/dino @ 7c446df; method notes ``docs/methods/dino.md``.
Student sees every crop; the teacher (EMA, BN in batch-statistics mode) sees the global crops only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from losses.dino import DINOLoss, sinkhorn_teacher_probs, teacher_probs
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.ema import make_teacher
from models.heads import DINOHead
from models.residual_init import set_zero_init_residual
from models.ssl_net import BackboneWithHead
from optim.schedules import ema_momentum, teacher_temperature
from runtime.config_loader import ConfigError, bounded


@dataclass
class DINOConfig:
    out_dim: int = bounded(65536, ge=2)  # prototypes K; 65536 for ImageNet, a few thousand is plenty for small data
    hidden_dim: int = bounded(2048, ge=1)
    bottleneck_dim: int = bounded(256, ge=1)
    head_layers: int = bounded(3, ge=1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True  # fixed weight-norm gain: more stable, recommended for ResNet-50 and ViT-S
    student_temp: float = bounded(0.1, gt=0)
    teacher_temp: float = bounded(0.07, gt=0)  # final teacher temperature (0.04-0.07; lower = sharper targets)
    warmup_teacher_temp: float = bounded(0.04, gt=0)
    # linear warm-up of the teacher temperature, per epoch (capped at epochs)
    warmup_teacher_temp_epochs: int = bounded(50, ge=0)
    center_momentum: float = bounded(0.9, ge=0, lt=1)
    # EMA momentum at step 0, cosine to 1 (0.9995 for small batches)
    momentum_teacher: float = bounded(0.996, ge=0, lt=1)
    # How the teacher targets are kept from collapsing: "center" = DINO (subtract the EMA center, then softmax; the
    # spec's default), "sinkhorn" = DINOv2/SwAV Sinkhorn-Knopp over the global batch of teacher crops (3 iterations,
    # eps = teacher temperature): each batch is spread over the prototypes by construction. SCFS: applies to its DINO
    # head (the shallow heads keep their own centers).
    centering: Literal["center", "sinkhorn"] = "center"
    # gamma = 0 in each residual block's last BN: off, as the official torchvision resnet50() (timm's default is on)
    zero_init_residual: bool = False


def build_dino_student(cfg) -> BackboneWithHead:
    backbone = build_backbone(cfg.model)
    s = cfg.ssl
    set_zero_init_residual(backbone, s.zero_init_residual)
    head = DINOHead(feature_dim(backbone), s.out_dim, s.hidden_dim, s.bottleneck_dim, s.head_layers,
                    s.use_bn_in_head, s.norm_last_layer)
    return BackboneWithHead(backbone, head)


@register_method("dino")
class DINO(SSLMethod):
    Config = DINOConfig
    eval_weights = "teacher"  # DINO evaluates the teacher (--checkpoint_key teacher)
    eval_protocol = "dino"  # DINO's eval_linear.py

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.ssl
        self.epochs = cfg.train.epochs
        self.student = self.build_student(cfg)
        self.teacher = make_teacher(self.student)
        self.loss = DINOLoss(self.cfg.out_dim, self.cfg.student_temp, self.cfg.center_momentum, self.cfg.centering)

    def build_student(self, cfg):
        """The trained network (subclasses such as SCFS add heads); the teacher is its EMA copy."""
        return build_dino_student(cfg)

    def teacher_temp(self, ctx: StepContext) -> float:
        s = self.cfg
        return teacher_temperature(ctx.epoch, s.warmup_teacher_temp, s.teacher_temp,
                                   min(s.warmup_teacher_temp_epochs, self.epochs))

    def ema_momentum(self, ctx: StepContext) -> float:
        return ema_momentum(ctx.step, ctx.total_steps, self.cfg.momentum_teacher)

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        with torch.no_grad():
            t_out = self.teacher(views[:n_global])  # (T, B, K)
        s_out = self.student(views)  # (S, B, K)
        temp = self.teacher_temp(ctx)
        loss, t_sum = self.loss.loss_and_teacher_sum(s_out, t_out, temp)  # t_sum: the fused kernel's column sum
        self.loss.reduce_center_update(t_out, t_sum)  # async all-reduce overlaps the backward pass
        return StepOutput(loss, {"teacher_temp": torch.tensor(temp)}, self.teacher_state(t_out, temp))

    @staticmethod
    def teacher_state(t_out: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
        """What :meth:`teacher_distribution` needs: the teacher logits (T, B, K) (a reference) and the temperature."""
        return {"teacher_logits": t_out, "teacher_temp": torch.tensor(temp)}

    @torch.no_grad()
    def teacher_distribution(self, out: StepOutput) -> torch.Tensor | None:
        """The centred (center of before this step), sharpened teacher softmax (T, B, K), as in the loss."""
        logits, temp = out.state["teacher_logits"], float(out.state["teacher_temp"])
        if self.cfg.centering == "sinkhorn":
            return sinkhorn_teacher_probs(logits, temp)
        return teacher_probs(logits, self.loss.center, temp)

    @torch.no_grad()
    def update_state(self, out: StepOutput, ctx: StepContext) -> None:
        self.loss.apply_center_update()

    def last_layer_names(self) -> tuple[str, ...]:
        return ("last_layer",)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.n_global < 2:
            raise ConfigError(f"data.views: DINO needs 2 global crops, got {cfg.data.n_global}")
