"""CW-RGP (Weng et al., NeurIPS 2022, "An Investigation into Whitening Loss for Self-supervised Learning").

Reference: winci-ai/CW-RGP @ 5bbf6ed (``ImageNet/methods/cwrgp.py``, ``ImageNet/model.py``, ``ImageNet/train.py``);
method notes ``docs/methods/cw_rgp.md``.

A symmetric network with a shared encoder, no predictor and no momentum network. As upstream, the backbone runs on
each view separately (per-view BN statistics; ``ssl.bn_per_view``) and the head runs once on all views
concatenated (its BN statistics span every view). Whitening and loss are **per GPU**: nothing is gathered.

The random sample partitions and channel permutations come from a generator seeded by (``train.seed``, step,
rank), so they are reproducible and a resumed run redraws the same ones (upstream uses the global torch RNG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losses.cw_rgp import CWRGPLoss, partition_generator
from methods.base import SSLMethod, StepContext, StepOutput
from methods.registry import register_method
from models.backbone import build_backbone, feature_dim
from models.heads import MLPConfig, build_mlp
from models.multicrop import forward_multicrop
from models.residual_init import set_zero_init_residual
from models.ssl_net import BackboneWithHead
from runtime import dist
from runtime.config_loader import ConfigError, bounded


@dataclass
class CWRGPConfig:
    head_hidden_dim: int = bounded(2048, ge=1)  # ImageNet 2048; CIFAR/STL 1024; Tiny-ImageNet 2048
    head_layers: int = bounded(3, ge=1)  # ImageNet 3 (Linear-BN-ReLU x2 + Linear); small datasets 2
    emb_dim: int = bounded(1024, ge=1)  # whitened width D (ImageNet/Tiny 1024, CIFAR/STL 512)
    head_bn: bool = True  # BN after each hidden linear (upstream --no_add_bn turns it off)
    groups: int = bounded(2, ge=1)  # channel groups G; emb_dim / groups must be >= w_size (ImageNet 2, CIFAR 4)
    # samples per whitening sub-batch; must divide data.batch_size (per GPU) (CIFAR 64)
    w_size: int = bounded(128, ge=1)
    w_iter: int = bounded(1, ge=1)  # random partitions per step, losses averaged (CW-RGP 2 on CIFAR-10 uses 4)
    eps: float = bounded(0.0, ge=0, lt=1)  # ridge towards I of each Gram matrix (upstream w_eps, 0)
    minus: int = bounded(1, ge=0)  # Gram denominator d - minus
    norm: bool = True  # normalised MSE between whitened views; false = plain MSE (upstream --no_norm)
    rand_group: bool = True  # new random channel permutation per (sub-batch, view); false = fixed groups (CW)
    # weight of the covariance term on un-whitened outputs (ImageNet 100 ep: 0.005)
    cov_weight: float = bounded(0.0, ge=0)
    # the covariance term is off from this epoch on (ImageNet 100 ep: 50; 200 ep: 100)
    cov_stop_epochs: int = bounded(50, ge=0)
    bn_per_view: bool = True  # one backbone pass per view (official); false = one pass per resolution (faster)
    zero_init_residual: bool = True  # torchvision resnet(zero_init_residual=True) upstream

    def __post_init__(self) -> None:
        if self.emb_dim % self.groups:
            raise ConfigError(f"ssl.groups: must divide ssl.emb_dim={self.emb_dim}, got {self.groups}")
        if self.emb_dim // self.groups < self.w_size:
            raise ConfigError(f"ssl.w_size: {self.w_size} samples per sub-batch need at least as many channels per "
                              f"group, but emb_dim / groups = {self.emb_dim // self.groups} (the Gram matrix would "
                              "be singular); lower ssl.w_size or ssl.groups")


@register_method("cw_rgp")
class CWRGP(SSLMethod):
    Config = CWRGPConfig
    eval_weights = "student"
    eval_protocol = "cw_rgp"  # CW-RGP lincls.py

    def __init__(self, cfg):
        super().__init__()
        s = self.cfg = cfg.ssl
        self.seed = cfg.train.seed
        backbone = build_backbone(cfg.model)
        set_zero_init_residual(backbone, cfg.ssl.zero_init_residual)
        head_cfg = MLPConfig(s.head_hidden_dim, s.emb_dim, s.head_layers, "bn" if s.head_bn else "none", "relu")
        self.student = BackboneWithHead(backbone, build_mlp(feature_dim(backbone), head_cfg))
        self.teacher = None
        self.loss = CWRGPLoss(s.groups, s.w_size, s.w_iter, s.eps, s.minus, s.norm, s.rand_group)

    def cov_weight(self, ctx: StepContext) -> float:
        """Covariance-term weight at ``ctx``: on before ``cov_stop_epochs``, then 0 (upstream switches it off after
        the first iteration of that epoch; one step of difference)."""
        return self.cfg.cov_weight if ctx.epoch < self.cfg.cov_stop_epochs else 0.0

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        net = self.student
        if self.cfg.bn_per_view:
            feats = torch.cat([net.backbone(v) for v in views])
        else:
            feats = forward_multicrop(net.backbone, views)
        z = net.head(feats).unflatten(0, (len(views), -1))  # head BN over all views at once, as upstream
        gen = partition_generator(self.seed, ctx.step, dist.rank(), z.device)
        sample_perm, channel_perm = self.loss.draw(z, gen)
        loss, logs = self.loss(z, sample_perm, channel_perm, self.cov_weight(ctx))
        return StepOutput(loss, logs, {})

    @classmethod
    def check_config(cls, cfg) -> None:
        n_views = cfg.data.n_global + cfg.data.n_local
        if n_views < 2:
            raise ConfigError(f"data.views: CW-RGP needs at least 2 views (official: 4), got {n_views}")
        if cfg.data.batch_size % cfg.ssl.w_size:
            raise ConfigError(f"ssl.w_size: {cfg.ssl.w_size} must divide the per-GPU data.batch_size "
                              f"{cfg.data.batch_size} (whitening is per GPU)")
