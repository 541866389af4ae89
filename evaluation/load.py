"""Rebuild a pretrained backbone from a flashssl checkpoint (config + weights are both in the file)."""

from __future__ import annotations

from torch import nn

from methods import build_method
from runtime.checkpoint import CheckpointError, load_checkpoint
from runtime.config import Config, config_from_dict


def load_method(path: str) -> tuple[nn.Module, Config]:
    """The SSL method module with the checkpoint's weights, and the run's resolved config."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    method = build_method(cfg)
    missing, unexpected = method.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match method={cfg.method} backbone={cfg.model.backbone} "
                              f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)")
    return method, cfg


def load_backbone(path: str, which: str = "auto") -> tuple[nn.Module, Config]:
    """The backbone to evaluate: ``which`` in {'auto', 'student', 'teacher'} (auto = the method's official choice)."""
    method, cfg = load_method(path)
    return method.backbone_for_eval(which), cfg
