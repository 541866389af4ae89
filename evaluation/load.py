"""Rebuild a pretrained backbone from a flashssl checkpoint (config + weights are both in the file).

Every way a checkpoint can be unusable raises :class:`CheckpointError` (or ConfigError for a config that no longer
validates) with a message naming the file: not a checkpoint, a config naming an unknown method, ``meta`` that
disagrees with the config (a file from another method/architecture), weights that do not fit the architecture the
config builds (missing or unexpected keys, wrong shapes).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from methods import build_method
from runtime.checkpoint import CheckpointError, find_resumable, load_checkpoint
from runtime.config import Config, config_from_dict
from runtime.config_loader import ConfigError


def read_checkpoint(path: str) -> tuple[dict[str, Any], Config]:
    """The checkpoint dict and its resolved config, after consistency checks."""
    state = load_checkpoint(path)
    if not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: 'config' and 'model' must be mappings (not a flashssl checkpoint?)")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the stored config is invalid: {e}") from None
    meta = state.get("meta") or {}
    for key, value in (("method", cfg.method), ("backbone", cfg.model.backbone)):
        if key in meta and meta[key] != value:
            raise CheckpointError(f"{path}: meta.{key}={meta[key]!r} but its config says {value!r} (a checkpoint "
                                  "assembled from different runs?)")
    return state, cfg


def load_method(path: str) -> tuple[nn.Module, Config]:
    """The SSL method module with the checkpoint's weights, and the run's resolved config."""
    method, cfg, _ = method_from_checkpoint(path)
    return method, cfg


def method_from_checkpoint(path: str) -> tuple[nn.Module, Config, dict[str, Any]]:
    """(method with the checkpoint's weights, resolved config, the checkpoint dict)."""
    state, cfg = read_checkpoint(path)
    method = build_method(cfg)
    try:
        missing, unexpected = method.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1:3]
        raise CheckpointError(f"{path}: weights do not fit method={cfg.method} backbone={cfg.model.backbone}: "
                              f"{'; '.join(first) or e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match method={cfg.method} backbone={cfg.model.backbone} "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    return method, cfg, state


def load_backbone(path: str, which: str = "auto") -> tuple[nn.Module, Config]:
    """The backbone to evaluate: ``which`` in {'auto', 'student', 'teacher'} (auto = the method's official choice)."""
    method, cfg = load_method(path)
    return method.backbone_for_eval(which), cfg


def resolve_checkpoint(spec: str) -> str:
    """A checkpoint file, or the newest valid ``ckpt_step*.pt`` of a run directory (CheckpointError if none)."""
    if os.path.isdir(spec):
        found = find_resumable(spec)
        if found is None:
            raise CheckpointError(f"no valid checkpoint (ckpt_step*.pt) in directory {spec}")
        return found[0]
    return spec
