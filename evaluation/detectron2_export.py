"""``eval.py export --format detectron2``: the evaluated ResNet backbone as the pickle detectron2 initialises from.

The detection transfer of MoCo (facebookresearch/moco ``detection/convert-pretrain-to-detectron2.py``), which INTL
and CW-RGP reuse, renames a torchvision ResNet to detectron2's ``ResNet`` module names
(:func:`evaluation.resnet_keys.detectron2_name`) and pickles ``{"model": {name: numpy array}, "__author__": ...,
"matching_heuristics": True}``. detectron2's ``DetectionCheckpointer`` reads such a ``.pkl`` as a non-detectron2
model and, with ``matching_heuristics``, matches the names to ``backbone.bottom_up.*`` of its R-50 (C4 or FPN)
config. Every backbone tensor is written (BN running statistics and ``num_batches_tracked`` included); the timm
classifier does not exist (``num_classes=0``).

Bottleneck ResNets (resnet50/101/152) map onto detectron2's default ``BottleneckBlock`` configs
(``MODEL.RESNETS.DEPTH`` 50/101/152). Basic-block ResNets (resnet18/34) use the same names with ``conv1``/``conv2``
only; detectron2 builds them with ``MODEL.RESNETS.DEPTH: 18`` (or 34) and ``MODEL.RESNETS.RES2_OUT_CHANNELS: 64``
(the C4 head needs a bottleneck res5, so use an FPN config). Other backbones (ViT, deep-stem ResNets) are refused.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch import nn

from evaluation.resnet_keys import detectron2_name, resnet_structure
from runtime.atomic import atomic_path
from runtime.checkpoint import CheckpointError

DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): None, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def resnet_depth(sd: dict[str, torch.Tensor], what: str) -> int:
    """detectron2's ``MODEL.RESNETS.DEPTH`` for a torchvision-named ResNet state dict (18/34/50/101/152)."""
    blocks, bottleneck, _ = resnet_structure(sd, what)
    if blocks not in DEPTHS:
        raise CheckpointError(f"{what}: ResNet blocks {list(blocks)} match no detectron2 depth (18/34/50/101/152)")
    return DEPTHS[blocks] or (50 if bottleneck else 34)


def to_detectron2(sd: dict[str, torch.Tensor], what: str = "backbone") -> dict[str, np.ndarray]:
    """Rename every tensor of a timm/torchvision ResNet state dict to detectron2's names, as numpy arrays."""
    resnet_depth(sd, what)  # validates the naming
    out = {detectron2_name(k): v.detach().cpu().numpy() for k, v in sd.items() if not k.startswith("fc.")}
    if len(out) != sum(not k.startswith("fc.") for k in sd):
        raise CheckpointError(f"{what}: two tensors map to one detectron2 name")  # cannot happen for ResNets
    return out


def export_detectron2(checkpoint: str, out: str, which: str = "auto") -> dict:
    """Write the evaluated backbone of a flashssl ``checkpoint`` to ``out`` (.pkl); returns a summary."""
    from evaluation.export import require_imagenet_stem
    from evaluation.load import method_from_checkpoint

    if not out.endswith(".pkl"):
        raise ValueError(f"--out {out!r}: must end in .pkl (detectron2 reads non-detectron2 weights from .pkl)")
    method, cfg, _ = method_from_checkpoint(checkpoint)
    require_imagenet_stem(cfg, checkpoint, "detectron2")
    backbone: nn.Module = method.backbone_for_eval(which)
    what = f"{checkpoint} (backbone {cfg.model.backbone})"
    sd = backbone.state_dict()
    model = to_detectron2(sd, what)
    depth = resnet_depth(sd, what)
    weights = method.eval_weights if which == "auto" else which
    blob = {"model": model, "__author__": f"flashssl {cfg.method} ({weights})", "matching_heuristics": True}
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        pickle.dump(blob, f)
    return {"out": os.path.abspath(out), "tensors": len(model), "depth": depth, "architecture": cfg.model.backbone,
            "config_hint": f"MODEL.RESNETS.DEPTH {depth}" + (" MODEL.RESNETS.RES2_OUT_CHANNELS 64 (FPN config)"
                                                             if depth in (18, 34) else "")}
