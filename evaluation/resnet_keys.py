"""The torchvision / timm ResNet state_dict naming, shared by the official-checkpoint import and the detectron2 export.

timm's ``resnet18/34/50/101/152`` (and ``wide_resnet*``) use torchvision's parameter names exactly: a stem ``conv1``
+ ``bn1``, stages ``layer1``..``layer4`` of blocks ``layerS.B`` with ``conv1..conv2`` (basic block) or ``conv1..conv3``
(bottleneck), their norms ``bn1..bn3``, a projection shortcut ``downsample.0`` (conv) + ``downsample.1`` (BN) in the
first block of a stage whose shape changes, and the classifier ``fc``. Variants with a deep stem (``resnet50d``:
``conv1.0``...) or other block types do not follow this naming and are rejected by :func:`resnet_structure`.
"""

from __future__ import annotations

import re

import torch

from runtime.checkpoint import CheckpointError

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")
_STEM = ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var")
#: (blocks per stage, bottleneck, layer1 width of the first 1x1/3x3 conv) -> timm model name
ARCHS: dict[tuple[tuple[int, ...], bool, int], str] = {
    ((2, 2, 2, 2), False, 64): "resnet18",
    ((3, 4, 6, 3), False, 64): "resnet34",
    ((3, 4, 6, 3), True, 64): "resnet50",
    ((3, 4, 23, 3), True, 64): "resnet101",
    ((3, 8, 36, 3), True, 64): "resnet152",
    ((3, 4, 6, 3), True, 128): "wide_resnet50_2",
    ((3, 4, 23, 3), True, 128): "wide_resnet101_2",
}


def resnet_structure(sd: dict[str, torch.Tensor], what: str) -> tuple[tuple[int, ...], bool, int]:
    """(blocks per stage, bottleneck?, layer1.0.conv1 output width) of a torchvision-named ResNet state dict.

    Raises CheckpointError naming ``what`` when the keys are not that naming (e.g. a ViT, a deep-stem ResNet).
    """
    missing = [k for k in _STEM if k not in sd]
    if missing or "layer1.0.conv1.weight" not in sd:
        sample = ", ".join(sorted(sd)[:6])
        gone = missing[:3] or ["layer1.0.conv1.weight"]
        raise CheckpointError(f"{what}: not a torchvision/timm ResNet state dict (missing {gone}; keys start "
                              f"{sample} ...)")
    blocks = [0, 0, 0, 0]
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            s, b = int(m.group(1)) - 1, int(m.group(2))
            blocks[s] = max(blocks[s], b + 1)
    bottleneck = "layer1.0.conv3.weight" in sd
    return tuple(blocks), bottleneck, int(sd["layer1.0.conv1.weight"].shape[0])


def infer_resnet_arch(sd: dict[str, torch.Tensor], what: str) -> str:
    """The timm model name whose ``num_classes=0`` state dict has the structure of ``sd``."""
    key = resnet_structure(sd, what)
    if key not in ARCHS:
        blocks, bottleneck, width = key
        raise CheckpointError(f"{what}: a ResNet with blocks {list(blocks)} ({'bottleneck' if bottleneck else 'basic'}"
                              f", width {width}) matches none of {', '.join(sorted(set(ARCHS.values())))}; pass --arch")
    return ARCHS[key]


def detectron2_name(key: str) -> str:
    """torchvision/timm ResNet key -> detectron2 ResNet key (the rule of MoCo's convert-pretrain-to-detectron2.py).

    ``conv1.weight`` -> ``stem.conv1.weight``; ``bn1.*`` -> ``stem.conv1.norm.*``; ``layerS.B.convN`` ->
    ``res{S+1}.B.convN``; ``layerS.B.bnN`` -> ``res{S+1}.B.convN.norm``; ``downsample.0`` -> ``shortcut``;
    ``downsample.1`` -> ``shortcut.norm``.
    """
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = re.sub(r"(^|\.)bn([1-3])\.", lambda m: f"{m.group(1)}conv{m.group(2)}.norm.", key)
    return key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
