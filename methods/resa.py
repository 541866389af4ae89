"""ReSA (Weng et al., ICML 2025): representation self-assignment. A Sinkhorn assignment computed from the encoder
outputs of the weak view is the target of a softmax over cross-view embedding similarities (online vs momentum).

Reference: winci-ai/resa @ e7869d1 (HEAD loss); method notes ``docs/methods/resa.md``.

View order (``data.views``, globals first): **view 0 is the weak view** (crop + flip only; it alone defines the
assignment), view 1 the strong 224 view, further views (multi-crop) are extra online views. The momentum network
sees views 0 and 1 only (``ssl.momentum_views``).

Differences from the official code:
* EMA order: the official forward updates the momentum network at the start of step t with ``m_t`` (a cosine
  schedule over iterations); here the base ``after_step`` updates it after step t-1 with ``m_t`` (hence the
  ``step + 1`` in :meth:`ReSA.ema_momentum`). Same weights at every momentum forward; the official step-0 update is
  a no-op because the momentum network starts as a copy. The final checkpoint has one more EMA update.
* The similarity matmuls run in fp32 (the official ones run in fp16 under autocast; spec §1.4).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from losses.resa import ReSALoss
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.ema import make_teacher
from models.heads import MLPConfig, build_mlp
from models.multicrop import forward_multicrop
from models.residual_init import set_zero_init_residual
from optim.schedules import ema_momentum
from runtime import dist
from runtime.config_loader import ConfigError, bounded


@dataclass
class ReSAConfig:
    proj_hidden_dim: int = bounded(2048, ge=1)  # projector (Linear-BN-ReLU) x 2 -> Linear -> BN(affine=False)
    proj_layers: int = bounded(3, ge=1)
    out_dim: int = bounded(512, ge=1)  # embedding width
    predictor: bool = True  # online predictor Linear(512->2048)-BN-ReLU-Linear(2048->512); the CIFAR recipe has none
    pred_hidden_dim: int = bounded(2048, ge=1)
    temperature: float = bounded(0.4, gt=0)  # tau of the relation softmax
    sinkhorn_eps: float = bounded(0.05, gt=0)  # hard-coded in the official code
    sinkhorn_iters: int = bounded(3, ge=1)  # hard-coded in the official code
    momentum: float = bounded(0.996, ge=0, lt=1)  # EMA momentum at step 0, cosine to 1 over training
    momentum_views: int = bounded(2, ge=1)  # views 0 (weak) and 1 (first strong) go through the momentum network
    per_view_bn: bool = True  # one forward per view (BN statistics per view), as the official ResNet code
    zero_init_residual: bool = True  # gamma = 0 in the last BN of each residual block (official ResNet recipe)


class ReSANet(nn.Module):
    """Encoder + projector (+ predictor on the online side). ``embed`` returns encoder outputs and embeddings."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def _heads(self, feats: torch.Tensor) -> torch.Tensor:
        z = self.projector(feats)
        return self.predictor(z) if self.predictor is not None else z

    def embed(self, views: list[torch.Tensor], per_view: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (encoder outputs (V, B, E), embeddings (V, B, D)); unnormalised (the loss normalises)."""
        if per_view:
            feats = [self.backbone(v) for v in views]
            return torch.stack(feats), torch.stack([self._heads(f) for f in feats])
        feats = forward_multicrop(self.backbone, views)
        return feats.unflatten(0, (len(views), -1)), self._heads(feats).unflatten(0, (len(views), -1))


def build_resa_net(cfg) -> ReSANet:
    s = cfg.ssl
    backbone = build_backbone(cfg.model)
    set_zero_init_residual(backbone, s.zero_init_residual)
    projector = build_mlp(feature_dim(backbone), MLPConfig(s.proj_hidden_dim, s.out_dim, s.proj_layers, norm="bn",
                                                           act="relu", last_norm=True, last_norm_affine=False))
    predictor = build_mlp(s.out_dim, MLPConfig(s.pred_hidden_dim, s.out_dim, 2, norm="bn", act="relu")) \
        if s.predictor else None
    return ReSANet(backbone, projector, predictor)


@register_method("resa")
class ReSA(SSLMethod):
    Config = ReSAConfig
    eval_weights = "teacher"  # the official linear probe and kNN load the momentum encoder
    eval_protocol = "resa"  # ReSA eval_linear.py

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.ssl
        self.student = build_resa_net(cfg)
        self.teacher = make_teacher(self.student)
        self.teacher.predictor = None  # the momentum branch has no predictor
        self.loss = ReSALoss(self.cfg.temperature, self.cfg.sinkhorn_eps, self.cfg.sinkhorn_iters, gather=True)

    def ema_momentum(self, ctx: StepContext) -> float:
        # applied after step t = the official update at the start of step t+1, which uses m_{t+1}
        return ema_momentum(min(ctx.step + 1, ctx.total_steps), ctx.total_steps, self.cfg.momentum)

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        """views[0]: weak view; views[1]: strong view; views[2:]: extra online crops. Each (B, 3, H, W)."""
        m = self.cfg.momentum_views
        feats, z = self.student.embed(views, self.cfg.per_view_bn)  # (V, B, E), (V, B, D)
        with torch.no_grad():
            feats_bar, z_bar = self.teacher.embed(views[:m], self.cfg.per_view_bn)
        loss, assignment = self.loss(z, feats[0].detach(), z_bar, feats_bar[0])
        b = assignment.shape[0]
        own = torch.arange(b, device=assignment.device) + dist.rank() * b  # column of each local row's own sample
        self_mass = assignment.gather(1, own[:, None]).mean()  # 1 = pure instance discrimination, lower = clusters
        return StepOutput(loss, {"assign_self": self_mass.detach()}, {"assignment": assignment})

    @torch.no_grad()
    def teacher_distribution(self, out: StepOutput) -> torch.Tensor:
        """The Sinkhorn assignment of each online sample to the (gathered) momentum samples, (B, N)."""
        return out.state["assignment"]

    @classmethod
    def check_config(cls, cfg) -> None:
        views = cfg.data.expanded_views()
        m = cfg.ssl.momentum_views
        if len(views) < 2 or m > len(views):
            raise ConfigError(f"data.views: ReSA needs >= 2 views and >= ssl.momentum_views = {m}, got {len(views)}")
        weak = views[0]
        if max(weak.jitter_p, weak.grayscale_p, weak.blur_p, weak.solarize_p) > 0:
            warnings.warn("data.views[0] is ReSA's weak view that defines the assignment; the official recipe uses "
                          "crop + flip only (jitter_p, grayscale_p, blur_p, solarize_p = 0)", stacklevel=2)
