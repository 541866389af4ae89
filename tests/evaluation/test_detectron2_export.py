"""eval.py export --format detectron2: every backbone tensor under the name detectron2's ResNet gives it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import timm

import eval as eval_cli
from evaluation.detectron2_export import resnet_depth, to_detectron2
from evaluation.load import load_backbone
from runtime.checkpoint import CheckpointError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def detectron2_resnet_names(blocks: tuple[int, ...], bottleneck: bool) -> dict[str, tuple[int, ...] | None]:
    """The parameter/buffer names (-> conv weight shape) of detectron2's ``ResNet`` (bottom_up of its R-50 config),
    written from detectron2's module tree: ``stem.conv1`` (+ ``.norm``), stages ``res2``..``res5`` of blocks with
    ``conv1``..``conv3`` (basic: ``conv1``, ``conv2``), each a Conv2d with a ``norm`` submodule, and a ``shortcut``
    conv + norm in a block whose input and output channels differ (detectron2's rule)."""
    names: dict[str, tuple[int, ...] | None] = {"stem.conv1.weight": (64, 3, 7, 7)}
    names.update({f"stem.conv1.norm.{b}": None for b in BN})
    in_ch = 64
    for s, n in enumerate(blocks):
        width = 64 * 2 ** s
        out_ch = width * 4 if bottleneck else width
        for b in range(n):
            block = f"res{s + 2}.{b}"
            convs = ([(in_ch, width, 1), (width, width, 3), (width, out_ch, 1)] if bottleneck
                     else [(in_ch, width, 3), (width, width, 3)])
            for i, (cin, cout, k) in enumerate(convs, 1):
                names[f"{block}.conv{i}.weight"] = (cout, cin, k, k)
                names.update({f"{block}.conv{i}.norm.{x}": None for x in BN})
            if in_ch != out_ch:
                names[f"{block}.shortcut.weight"] = (out_ch, in_ch, 1, 1)
                names.update({f"{block}.shortcut.norm.{x}": None for x in BN})
            in_ch = out_ch
    return names


@pytest.mark.parametrize("arch,blocks,bottleneck,depth", [("resnet50", (3, 4, 6, 3), True, 50),
                                                          ("resnet18", (2, 2, 2, 2), False, 18)])
def test_complete_mapping_and_shapes(arch, blocks, bottleneck, depth):
    sd = timm.create_model(arch, num_classes=0).state_dict()
    out = to_detectron2(sd)
    want = detectron2_resnet_names(blocks, bottleneck)
    assert set(out) == set(want)  # every name detectron2 expects, nothing else
    assert len(out) == len(sd)  # no tensor lost
    for name, shape in want.items():
        if shape is not None:
            assert out[name].shape == shape, name
    assert isinstance(out["res5.2.conv3.norm.running_var" if bottleneck else "res5.1.conv2.norm.running_var"],
                      np.ndarray)
    # values travel unchanged: a few spot checks through independent names
    assert np.array_equal(out["stem.conv1.norm.running_mean"], sd["bn1.running_mean"].numpy())
    assert np.array_equal(out["res3.0.shortcut.norm.weight"], sd["layer2.0.downsample.1.weight"].numpy())
    assert np.array_equal(out["res4.1.conv2.weight"], sd["layer3.1.conv2.weight"].numpy())
    assert resnet_depth(sd, arch) == depth


def test_non_resnet_is_refused():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match="not a torchvision/timm ResNet"):
        to_detectron2(vit, "vit")
    deep_stem = timm.create_model("resnet18d", num_classes=0).state_dict()
    with pytest.raises(CheckpointError, match="not a torchvision/timm ResNet"):
        to_detectron2(deep_stem, "resnet18d")


def test_cli_writes_the_detectron2_container(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "backbone.pkl")
    assert eval_cli.main(["export", "--format", "detectron2", "--checkpoint", tiny_ckpt, "--out", out]) == 0
    assert "MODEL.RESNETS.DEPTH 18" in capsys.readouterr().out
    with open(out, "rb") as f:
        blob = pickle.load(f)
    assert set(blob) == {"model", "__author__", "matching_heuristics"} and blob["matching_heuristics"] is True
    ref, _ = load_backbone(tiny_ckpt)  # the evaluated (DINO: teacher) backbone
    sd = ref.state_dict()
    assert len(blob["model"]) == len(sd)
    assert np.array_equal(blob["model"]["res5.1.conv2.weight"], sd["layer4.1.conv2.weight"].numpy())
    assert eval_cli.main(["export", "--format", "detectron2", "--checkpoint", tiny_ckpt,
                          "--out", str(tmp_path / "x.pt")]) == 2
    assert ".pkl" in capsys.readouterr().err
