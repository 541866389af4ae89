"""EMA teacher: a frozen copy of the student updated with foreach ops, never inside ``forward``."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """Deep copy of ``student`` with gradients off and stochastic depth off (the EMA target).

    DINO builds its teacher without drop path (only the student gets ``drop_path_rate``); a plain deep copy would keep
    the student's timm ``DropPath`` modules active in the teacher, so their ``drop_prob`` is zeroed here.
    """
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- m * t + (1 - m) * s`` for every parameter (buffers such as BN statistics are not averaged).

    Parameters are paired by name so a frozen student parameter (e.g. DINO's fixed weight-norm gain) is still
    paired correctly. One fused foreach call per dtype/device group.
    """
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        s = s_params[name]
        t_list.append(t)
        s_list.append(s.detach())
    if t_list:
        torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
