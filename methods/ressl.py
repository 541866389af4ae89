"""ReSSL (Zheng et al., NeurIPS 2021): the student's relation of a strongly augmented crop to a queue of teacher keys
must match the teacher's sharper relation of a weakly augmented (crop + flip) view of the same image.

Reference: KyleZheng1997/ReSSL @ 4d67daa; notes ``docs/methods/ressl.md``. Covers the 1-crop (``ressl.py``) and
5-crop (``ressl_multi.py``) variants: every view after view 0 is a student crop.

View order (``data.views``, globals first): **view 0 is the teacher's weak view** (crop + flip only), views 1.. are
the student crops (the 224 strong crop, then for the 5-crop recipe 192/160/128/96). The loss is one-directional.

Differences from the official code, all numerically equivalent:
* EMA order: the official forward applies ``teacher <- m teacher + (1 - m) student`` *before* the teacher forward of
  step t; here the base ``after_step`` applies it after the optimiser step of step t-1. Same weights at every
  teacher forward (the official step-0 update is a no-op because the teacher starts as a copy).
* Enqueue: the official forward enqueues the gathered keys right after computing the logits; here
  ``update_state`` does it after the optimiser step. The logits of a step never see its own keys in either case.
* The queue is stored as (K, D) rows instead of (D, K) columns.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from losses.ressl import ReSSLLoss, relation_targets
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.ema import make_teacher
from models.heads import MLPConfig, build_mlp
from models.residual_init import set_zero_init_residual
from models.shuffle_bn import shuffled_forward
from models.ssl_net import BackboneWithHead
from runtime import dist
from runtime.config_loader import ConfigError, bounded


@dataclass
class ReSSLConfig:
    proj_hidden_dim: int = bounded(4096, ge=1)  # projector Linear(D->4096)-ReLU-Linear(4096->512), no BN, no predictor
    out_dim: int = bounded(512, ge=1)  # embedding width (L2-normalised)
    # K teacher keys (65536*2); the global batch must divide it; ~K/100 is fine on small data
    queue_size: int = bounded(131072, ge=1)
    student_temp: float = bounded(0.1, gt=0)  # tau_s, a literal in the official loss
    teacher_temp: float = bounded(0.04, gt=0)  # tau_t, the official --t (sharper than tau_s)
    momentum: float = bounded(0.999, ge=0, lt=1)  # constant EMA momentum of the teacher (no schedule)
    # MoCo shuffle-BN for the teacher forward across ranks (official). Alternative: model.sync_bn=true with this off.
    shuffle_bn: bool = True
    per_view_bn: bool = True  # one backbone pass per student crop (own BN batch), as ressl_multi.py
    zero_init_residual: bool = False  # the official torchvision ResNet does not zero-init (timm does by default)
    # Gaussian queue init; the same seed on every rank gives identical queues
    queue_seed: int = bounded(0, ge=0, le=2**63 - 1)


def build_ressl_net(cfg) -> BackboneWithHead:
    """Backbone + projector; the L2 normalisation is applied by :func:`encode`."""
    backbone = build_backbone(cfg.model)
    set_zero_init_residual(backbone, cfg.ssl.zero_init_residual)
    head = build_mlp(feature_dim(backbone), MLPConfig(cfg.ssl.proj_hidden_dim, cfg.ssl.out_dim, layers=2,
                                                      norm="none", act="relu"))
    return BackboneWithHead(backbone, head)


def encode(net: BackboneWithHead, views: list[torch.Tensor], per_view: bool) -> torch.Tensor:
    """Unit embeddings (V, B, D) in fp32; ``per_view`` runs one forward per view (own BN statistics)."""
    out = torch.cat([net([v]) for v in views]) if per_view else net(views)
    return F.normalize(out.float(), dim=-1)


def expected_world_size() -> int:
    """World size for config checks: the process group's if initialised, else torchrun's WORLD_SIZE (default 1)."""
    return dist.world_size() if dist.is_dist() else int(os.environ.get("WORLD_SIZE", "1"))


@register_method("ressl")
class ReSSL(SSLMethod):
    Config = ReSSLConfig
    eval_weights = "student"  # the official linear probe loads encoder_q (the student)
    eval_protocol = "ressl"  # ReSSL linear_eval.py

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.ssl
        self.student = build_ressl_net(cfg)
        self.teacher = make_teacher(self.student)
        self.loss = ReSSLLoss(self.cfg.out_dim, self.cfg.queue_size, self.cfg.student_temp, self.cfg.teacher_temp,
                              init_seed=self.cfg.queue_seed)
        _check_queue_divisible(self.cfg.queue_size, cfg.data.batch_size, expected_world_size())

    def ema_momentum(self, ctx: StepContext) -> float:
        return self.cfg.momentum

    def teacher_keys(self, weak: torch.Tensor) -> torch.Tensor:
        """Unit teacher keys (B, D) of the weak view, with shuffle-BN across ranks when enabled."""
        with torch.no_grad():
            if self.cfg.shuffle_bn:
                return shuffled_forward(lambda x: encode(self.teacher, [x], True)[0], weak)
            return encode(self.teacher, [weak], True)[0]

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        """views[0]: weak teacher view (B, 3, H, W); views[1:]: student crops. Loss = mean over student crops."""
        k = self.teacher_keys(views[0])
        q = encode(self.student, views[1:], self.cfg.per_view_bn)  # (S, B, D)
        loss = self.loss(q, k)
        return StepOutput(loss, {}, {"keys": k})

    @torch.no_grad()
    def teacher_distribution(self, out: StepOutput) -> torch.Tensor:
        """The teacher's relation of each key to the queue (before this step's keys are enqueued), (B, K)."""
        return relation_targets(out.state["keys"], self.loss.queue, self.cfg.teacher_temp)

    @torch.no_grad()
    def update_state(self, out: StepOutput, ctx: StepContext) -> None:
        """Enqueue the teacher keys of the step just taken, gathered from all ranks (identical queues everywhere)."""
        self.loss.enqueue(dist.gather_no_grad(out.state["keys"]))

    @classmethod
    def check_config(cls, cfg) -> None:
        views = cfg.data.expanded_views()
        if len(views) < 2:
            raise ConfigError(f"data.views: ReSSL needs the weak teacher view plus >= 1 student crop, got {len(views)}")
        _check_queue_divisible(cfg.ssl.queue_size, cfg.data.batch_size, expected_world_size())
        if cfg.ssl.shuffle_bn and cfg.model.sync_bn:
            raise ConfigError("ssl.shuffle_bn and model.sync_bn are alternatives: the official recipe is "
                              "ssl.shuffle_bn=true with model.sync_bn=false; set one of them to false")
        weak = views[0]
        if max(weak.jitter_p, weak.grayscale_p, weak.blur_p, weak.solarize_p) > 0:
            warnings.warn("data.views[0] is ReSSL's teacher view and should be weak (crop + flip only: jitter_p, "
                          "grayscale_p, blur_p and solarize_p = 0); a strong teacher view hurts ReSSL", stacklevel=2)


def _check_queue_divisible(queue_size: int, batch_size: int, world: int) -> None:
    if queue_size % (batch_size * world) != 0:
        raise ConfigError(f"ssl.queue_size: {queue_size} must be a multiple of the global batch "
                          f"data.batch_size * world_size = {batch_size} * {world} = {batch_size * world}")


__all__ = ["ReSSL", "ReSSLConfig", "encode"]
