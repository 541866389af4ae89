"""SCFS (Song et al., ICCV 2023): DINO plus self-distillation of ResNet stages 2-4 against searched teacher features.

Reference: skyoux/scfs @ 7bb7c37 (``main_scfs.py``, ``models/scfs.py``); notes ``docs/methods/scfs.md``.
Per step:

- student on the global crops (one call) and on the local crops (a second call; BN statistics per call, as the
  official code): DINO logits, shallow-head outputs of every stage, pooled local stage maps (detached queries);
- teacher (EMA, BN in batch-statistics mode) on the global crops only: DINO logits, shallow outputs, and for every
  stage the feature search of each local query in the map of **global crop 1** (:mod:`models.feature_search`),
  whose searched maps go through the teacher's shallow head;
- ``L = L_DINO + shallow_weight * sum_k (L^g_k + L^l_k) / 2``; the DINO center and the per-stage centers are
  all-reduced asynchronously during backward and applied after the optimiser step (after the EMA, as the official
  loop: the loss-state update and the EMA touch disjoint state, so their order does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch

from losses.scfs import SCFSShallowLoss
from methods.base import StepContext, StepOutput
from methods.dino import DINO, DINOConfig, build_dino_student
from methods.registry import register_method
from models.feature_search import searched_targets
from models.scfs_heads import SCFSNet, stage_indices
from runtime.config_loader import ConfigError, bounded


@dataclass
class SCFSConfig(DINOConfig):
    """DINO's ``ssl`` keys (same defaults as the SCFS command: teacher temp 0.04 -> 0.07 over 50 epochs) plus:"""

    # ResNet stages (timm ``layer{k}``) that get a shallow head
    shallow_stages: tuple[int, ...] = bounded((2, 3, 4), choices=(1, 2, 3, 4))
    shallow_bottleneck_dim: int = bounded(256, ge=1)  # width of the residual bottleneck on the stage map
    shallow_hidden_dim: int = bounded(2048, ge=1)  # hidden width of the shallow MLP
    shallow_out_dim: int = bounded(256, ge=1)  # shallow output (unit vector) and center width
    shallow_weight: float = bounded(1.0, ge=0)  # multiplier of sum_k (L^g_k + L^l_k) / 2; 1 = the official code

    def __post_init__(self) -> None:
        if not self.shallow_stages:
            raise ConfigError("ssl.shallow_stages: need at least one ResNet stage number in 1..4")
        if len(set(self.shallow_stages)) != len(self.shallow_stages):
            raise ConfigError(f"ssl.shallow_stages: repeated stage in {list(self.shallow_stages)}")


@register_method("scfs")
class SCFS(DINO):
    Config = SCFSConfig
    eval_weights = "teacher"  # SCFS evaluates the teacher backbone (--checkpoint_key teacher)
    eval_protocol = "dino"  # SCFS evaluates with DINO's eval_linear.py

    def __init__(self, cfg):
        super().__init__(cfg)  # student = self.build_student(cfg), teacher = its EMA copy, self.loss = DINOLoss
        s = self.cfg
        self.shallow_loss = SCFSShallowLoss(len(s.shallow_stages), s.shallow_out_dim, s.student_temp,
                                            s.center_momentum)

    def build_student(self, cfg) -> SCFSNet:
        base = build_dino_student(cfg)
        s = cfg.ssl
        return SCFSNet(base.backbone, base.head, s.shallow_stages, s.shallow_bottleneck_dim, s.shallow_hidden_dim,
                       s.shallow_out_dim)

    def forward(self, views: list[torch.Tensor], n_global: int, ctx: StepContext) -> StepOutput:
        # two student calls (globals, locals): per-call BN statistics as in the official code
        s_glob = self.student.forward_views(views[:n_global])
        s_loc = self.student.forward_views(views[n_global:])
        with torch.no_grad():
            t_glob = self.teacher.forward_views(views[:n_global])
            # search the teacher map of global crop 1 with each detached student local query, per stage
            t_search = searched_targets(self.teacher.shallow_heads, s_loc.pooled, t_glob.first_maps)
        temp = self.teacher_temp(ctx)
        s_logits = torch.cat([s_glob.logits, s_loc.logits], dim=0)  # (V, B, K), globals first
        loss_dino, t_sum = self.loss.loss_and_teacher_sum(s_logits, t_glob.logits, temp)
        loss_shallow, table = self.shallow_loss(s_glob.shallow, s_loc.shallow, t_glob.shallow, t_search, temp)
        loss = loss_dino + self.cfg.shallow_weight * loss_shallow
        self.loss.reduce_center_update(t_glob.logits, t_sum)  # async all-reduces overlap the backward pass
        self.shallow_loss.reduce_center_update(t_glob.shallow)
        logs = {"loss_dino": loss_dino.detach(), "loss_shallow": loss_shallow.detach(),
                "teacher_temp": torch.tensor(temp)}
        for k, stage in enumerate(self.cfg.shallow_stages):
            logs[f"loss_layer{stage}_global"], logs[f"loss_layer{stage}_local"] = table[k, 0], table[k, 1]
        return StepOutput(loss, logs, self.teacher_state(t_glob.logits, temp))

    @torch.no_grad()
    def update_state(self, out: StepOutput, ctx: StepContext) -> None:
        self.loss.apply_center_update()
        self.shallow_loss.apply_center_update()

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.data.n_local < 1:
            raise ConfigError("data.views: SCFS searches the global-crop maps with local crops; "
                              f"add at least one view with role 'local' (got {cfg.data.n_local})")
        name = cfg.model.backbone
        if not timm.is_model(name):
            return  # build_backbone reports unknown names with suggestions
        with torch.device("meta"):  # structure only: no memory, no weights
            probe = timm.create_model(name, num_classes=0, pretrained=False)
        try:
            stage_indices(probe, cfg.ssl.shallow_stages)
        except ValueError as e:
            raise ConfigError(f"model.backbone: SCFS needs a ResNet-style backbone with stages "
                              f"{[f'layer{k}' for k in cfg.ssl.shallow_stages]} for its shallow heads and "
                              f"feature search; {name!r} does not fit ({e})") from None
