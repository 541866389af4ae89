"""``eval.py export``: the evaluated backbone as a ``.safetensors`` file that plain timm loads.

The file holds exactly the ``state_dict`` of ``timm.create_model(<backbone>, num_classes=0)`` (parameters and BN
buffers; no heads, no classifier), so no flashssl code is needed to use it::

    model = timm.create_model("resnet50", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="backbone.safetensors", num_classes=0))

timm's ``load_pretrained`` reads a ``file=`` path ending in ``.safetensors`` with ``safetensors.torch.load_file``.
``num_classes=0`` in the overlay declares that the file has no classifier: a model created with
``num_classes=1000`` then gets its new classifier initialised randomly (timm drops the classifier keys and loads
non-strictly), while ``num_classes=0`` loads strictly, so a missing or extra key is an error. The header metadata
records the architecture, method, weights (teacher/student), step and source checkpoint.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from evaluation.load import load_method, method_from_checkpoint
from runtime.atomic import atomic_path


def backbone_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU copies of the backbone's state_dict (safetensors rejects aliased storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}


def export_backbone(checkpoint: str, out: str, which: str = "auto") -> dict:
    """Write the backbone of ``checkpoint`` to ``out`` (.safetensors); returns the metadata written."""
    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out!r}: must end in .safetensors (timm picks its loader by this suffix)")
    method, cfg, state = method_from_checkpoint(checkpoint)
    require_imagenet_stem(cfg, checkpoint, "timm")
    backbone = method.backbone_for_eval(which)
    resolved = method.eval_weights if which == "auto" else which
    meta = {"architecture": cfg.model.backbone, "method": cfg.method, "weights": resolved,
            "step": str(state.get("step", "")), "source": os.path.abspath(checkpoint),
            "num_features": str(getattr(backbone, "num_features", "")), "format": "timm state_dict, num_classes=0"}
    save_backbone_file(backbone, out, meta)
    return meta


def require_imagenet_stem(cfg, checkpoint: str, target: str) -> None:
    """Refuse a backbone trained with ``model.stem=cifar`` (3x3 ``conv1``, no max-pool): no stock ResNet of
    ``target`` (timm, detectron2) has that stem, so the written file would not load."""
    if cfg.model.stem != "imagenet":
        raise ValueError(f"{checkpoint}: trained with model.stem={cfg.model.stem} (3x3/1 conv1, no max-pool); a stock "
                         f"{target} {cfg.model.backbone} has the ImageNet stem and cannot load it. Use the checkpoint "
                         "with eval.py (knn, linear, probe), or build the model with "
                         "models.backbone.build_backbone(ModelConfig(backbone=..., stem='cifar'))")


def save_backbone_file(backbone: nn.Module, out: str, meta: dict[str, str]) -> None:
    """Atomically write ``backbone``'s state_dict with string ``meta`` as a .safetensors file (temp file + rename)."""
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file(backbone_tensors(backbone), tmp, metadata=meta)


def load_exported(path: str, num_classes: int = 0, name: str | None = None) -> nn.Module:
    """Load an exported file the way a user would: plain ``timm.create_model(..., pretrained=True)``."""
    import timm
    from safetensors import safe_open

    if name is None:
        with safe_open(path, framework="pt") as f:
            name = f.metadata()["architecture"]
    return timm.create_model(name, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=os.path.abspath(path), num_classes=0))


@torch.no_grad()
def verify_export(checkpoint: str, out: str, which: str = "auto", size: int = 64) -> float:
    """Max |difference| between the checkpoint's backbone and the timm-loaded export on random input (eval mode)."""
    method, _ = load_method(checkpoint)
    ref = method.backbone_for_eval(which).eval()
    loaded = load_exported(out).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return float((ref(x) - loaded(x)).abs().max())


def usage(meta: dict, out: str) -> str:
    return (f"import timm\nmodel = timm.create_model({meta['architecture']!r}, pretrained=True, num_classes=0,\n"
            f"    pretrained_cfg_overlay=dict(file={os.path.abspath(out)!r}, num_classes=0))\n"
            f"# metadata: {json.dumps(meta)}")
