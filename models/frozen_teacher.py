"""A frozen, pretrained teacher network loaded from a local checkpoint (MV-MR's CLIP-distillation variant).

Official variant (vkinakh/mv-mr @ 7136f70 ``src/model/clip_self_supervised_module.py``): the visual tower of
open_clip ``ViT-B-16`` / ``laion400m_e32`` in eval mode, fed the *dataset-normalised* original view resized
bilinearly to 224 px. Here any timm model with a state-dict file, or an open_clip model with a local checkpoint file
(when open_clip is installed) can be the teacher. Nothing is ever downloaded.

The same weights exist in timm as ``vit_base_patch16_clip_224.laion400m_e32`` (projection head of width 512); to make
the local file once on a machine with internet access::

    m = timm.create_model("vit_base_patch16_clip_224.laion400m_e32", pretrained=True, num_classes=512)
    torch.save(m.state_dict(), "checkpoints/clip_vit_b16_laion400m_e32.pt")

The teacher's weights are deliberately *not* part of the method's ``state_dict`` (they are a constant input named in
the config, reloaded from ``checkpoint`` on resume, and would multiply the checkpoint size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config_loader import ConfigError, bounded


@dataclass
class FrozenTeacherConfig:
    """The ``ssl.teacher`` section. ``kind: none`` (default) = no teacher."""

    kind: Literal["none", "timm", "open_clip"] = "none"
    name: str = ""  # timm model name, or open_clip model name (e.g. ViT-B-16)
    checkpoint: str = ""  # local file: timm -> a state dict; open_clip -> a checkpoint open_clip can load
    # timm only: width of the head kept on the model (512 = CLIP projection; 0 = pooled features)
    num_classes: int = bounded(0, ge=0)
    # the original view is resized to this side (bilinear, align_corners=False) for the teacher
    input_size: int = bounded(224, ge=8)
    # the official code divides the teacher features by this before dCor (only affects the clamp)
    scale: float = bounded(32.0, gt=0)

    def __post_init__(self) -> None:
        if self.kind != "none":
            if not self.name:
                raise ConfigError(f"ssl.teacher.name: required when ssl.teacher.kind is {self.kind!r}")
            if not self.checkpoint:
                raise ConfigError(f"ssl.teacher.checkpoint: required when ssl.teacher.kind is {self.kind!r} "
                                  "(a local file; nothing is downloaded)")
        if self.name.startswith("hf-hub:"):
            raise ConfigError(f"ssl.teacher.name: {self.name!r} would download weights; use a local checkpoint")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict, unwrapping ``{'state_dict': ...}`` / ``{'model': ...}`` and a DDP ``module.`` prefix."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a loadable state dict
        raise ConfigError(f"ssl.teacher.checkpoint: cannot load {path!r} as a state dict: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"ssl.teacher.checkpoint: {path!r} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _build_timm(cfg: FrozenTeacherConfig) -> nn.Module:
    import timm

    if not timm.is_model(cfg.name):
        raise ConfigError(f"ssl.teacher.name: unknown timm model {cfg.name!r}")
    net = timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes)
    result = net.load_state_dict(_read_state_dict(cfg.checkpoint), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"ssl.teacher.checkpoint: {cfg.checkpoint!r} does not match timm {cfg.name!r} with num_classes="
            f"{cfg.num_classes}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]} "
            "(set ssl.teacher.num_classes to the checkpoint's head width, or 0 if it has none)")
    return net


def _build_open_clip(cfg: FrozenTeacherConfig) -> nn.Module:
    try:
        import open_clip
    except ImportError:
        raise ConfigError("ssl.teacher.kind: 'open_clip' needs the open_clip_torch package (pip install "
                          "open_clip_torch), or use kind 'timm' with the same weights") from None
    model = open_clip.create_model(cfg.name, pretrained=cfg.checkpoint)  # a file path: loaded locally
    return model.visual


def build_teacher_net(cfg: FrozenTeacherConfig) -> nn.Module:
    """The teacher network described by ``cfg`` with its weights loaded (raises ConfigError naming the key)."""
    if cfg.kind == "none":
        raise ValueError("build_teacher_net called with ssl.teacher.kind 'none'")
    if not os.path.isfile(cfg.checkpoint):
        raise ConfigError(f"ssl.teacher.checkpoint: file not found: {cfg.checkpoint!r} (nothing is downloaded; "
                          "see models/frozen_teacher.py for how to make it)")
    return _build_timm(cfg) if cfg.kind == "timm" else _build_open_clip(cfg)


class FrozenTeacher(nn.Module):
    """Wraps a teacher network: always in eval mode, no gradients, not in ``state_dict``/``parameters()``.

    ``forward(x)``: (B, 3, H, W) -> (B, D) float32 features of ``x`` resized to ``input_size``.
    """

    def __init__(self, net: nn.Module, input_size: int = 224):
        super().__init__()
        net.eval().requires_grad_(False)
        self._net = [net]  # a list hides it from the module tree (state_dict, parameters, DDP)
        self.input_size = input_size

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    def _apply(self, fn, recurse: bool = True):  # .to(device), .half(), channels_last ... reach the hidden net
        self._net[0] = self._net[0]._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.net.eval()  # BN / dropout of the teacher stay in inference mode
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(x).float()
