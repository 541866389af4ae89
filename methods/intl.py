"""INTL (Weng et al., ICLR 2024, "Modulate Your Spectrum in Self-Supervised Learning"): IterNorm + trace loss.

Reference: winci-ai/INTL @ 0aa69af (``methods/intl.py``, ``methods/intl_m.py``, ``src/model.py``, ``main.py``);
method notes ``docs/methods/intl.md``.

Two variants behind ``ssl.ema``:

* ``ema: false`` (``intl``): a symmetric Siamese network; every view goes through backbone + projector and is
  whitened; view 0 anchors every pair.
* ``ema: true`` (``intl_m``): a momentum copy of backbone + projector; **view 0 goes only through the momentum
  network** (the target), views 1..V-1 only through the online network, and only online views get the trace loss.
  Upstream applies the EMA at the start of each forward with ``m(step)``; the base class applies it after the
  optimiser step, so :meth:`INTL.ema_momentum` returns ``m(step + 1)``: the same update at the same point.

Like upstream, the backbone and the projector run once **per view** by default, so every BN layer sees the batch
statistics of one view (``ssl.bn_per_view``). The online backbone is evaluated (upstream ``evaluate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from losses.intl import INTLLoss
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.ema import make_teacher
from models.heads import MLPConfig, build_mlp
from models.residual_init import set_zero_init_residual
from models.ssl_net import BackboneWithHead
from optim.schedules import ema_momentum
from runtime.config_loader import ConfigError, bounded


@dataclass
class INTLConfig:
    proj_hidden_dim: int = bounded(8192, ge=1)  # ImageNet 8192; CIFAR 2048; IN-100 4096
    # Linear(no bias)-BN-ReLU x (layers-1), then a biased Linear with nothing after it
    proj_layers: int = bounded(3, ge=1)
    emb_dim: int = bounded(8192, ge=1)  # width of the whitened embedding (CIFAR 2048)
    # IterNorm Newton-Schulz steps T; few steps modulate the spectrum rather than fully whiten
    iters: int = bounded(4, ge=1)
    # 0 = channel whitening of the N x N sample Gram (official); 1 = batch whitening (D x D)
    axis: int = bounded(0, choices=(0, 1))
    # trace-loss weight; None = 0.01 (log2(global batch) - 3) (0.05 at B = 256)
    trade_off: float | None = bounded(None, ge=0)
    gather: bool = True  # whiten the all-gathered global batch with gradient (official); false = per GPU (ablation)
    ema: bool = False  # true = intl_m: momentum target network on view 0 (the multi-crop ImageNet results)
    momentum: float = bounded(0.996, ge=0, lt=1)  # EMA momentum at step 0, cosine to 1 (CIFAR: 0.999)
    bn_per_view: bool = True  # one backbone/projector pass per view (official BN statistics); false = per resolution
    zero_init_residual: bool = True  # gamma = 0 in each residual block's last BN (official: on, off for resnet18)



def build_intl_projector(in_dim: int, s: INTLConfig) -> nn.Sequential:
    """INTL projector: hidden linears without bias (BN follows), the last linear with bias and no norm."""
    mlp = build_mlp(in_dim, MLPConfig(s.proj_hidden_dim, s.emb_dim, s.proj_layers, "bn", "relu", bias=False))
    last_in = s.proj_hidden_dim if s.proj_layers > 1 else in_dim
    mlp[-1] = nn.Linear(last_in, s.emb_dim, bias=True)
    return mlp


def embed_views(net: BackboneWithHead, views: list[torch.Tensor], per_view: bool) -> torch.Tensor:
    """``head(backbone(view))`` for every view -> (V, B, D); ``per_view`` keeps BN statistics per view."""
    if per_view:
        return torch.stack([net.head(net.backbone(v)) for v in views])
    return net(views)


@register_method("intl")
class INTL(SSLMethod):
    Config = INTLConfig
    eval_weights = "student"  # upstream evaluates the online backbone (module.backbone.*)
    eval_protocol = "intl"  # INTL evaluate.py

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg.ssl
        backbone = build_backbone(cfg.model)
        set_zero_init_residual(backbone, cfg.ssl.zero_init_residual)
        self.student = BackboneWithHead(backbone, build_intl_projector(feature_dim(backbone), self.cfg))
        self.teacher = make_teacher(self.student) if self.cfg.ema else None
        self.loss = INTLLoss(self.cfg.iters, self.cfg.axis, self.cfg.trade_off, self.cfg.gather)

    def ema_momentum(self, ctx: StepContext) -> float:
        # upstream: EMA with m(t) at the start of step t == ours: EMA with m(t + 1) after step t
        return ema_momentum(ctx.step + 1, ctx.total_steps, self.cfg.momentum)

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        per_view = self.cfg.bn_per_view
        if self.teacher is None:
            loss, logs = self.loss(embed_views(self.student, views, per_view))
        else:
            with torch.no_grad():
                target = embed_views(self.teacher, views[:1], per_view)[0]  # (B, D)
            loss, logs = self.loss(embed_views(self.student, views[1:], per_view), target)
        return StepOutput(loss, logs, {})

    @classmethod
    def check_config(cls, cfg) -> None:
        n_views = cfg.data.n_global + cfg.data.n_local
        if n_views < 2:
            raise ConfigError(f"data.views: INTL needs at least 2 views, got {n_views}")
        if cfg.data.batch_size < 2:
            raise ConfigError(f"data.batch_size: INTL needs >= 2 samples per rank, got {cfg.data.batch_size}")
