"""eval.py import: each official repository's checkpoint layout is detected, mapped completely, and gives the features
of a torchvision ResNet loaded with the same tensors (the model those repos evaluate)."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
import timm
import torch
import torchvision

import eval as eval_cli
from evaluation.load import load_method
from evaluation.official_import import import_checkpoint, read_official, timm_backbone
from runtime.checkpoint import CheckpointError


def _random_resnet(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """torchvision ResNet state dict with random weights and random BN statistics (so eval-mode BN matters)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith("running_var"):
            sd[k] = torch.rand_like(v) + 0.5
        elif k.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
            sd[k] = torch.randn_like(v) * 0.1
    return sd


@pytest.fixture(scope="session")
def nets() -> dict[str, dict[str, torch.Tensor]]:
    """Two different random ResNet-18s (online / momentum) and one ResNet-50, torchvision names incl. fc."""
    return {"a": _random_resnet("resnet18", 1), "b": _random_resnet("resnet18", 2),
            "r50": _random_resnet("resnet50", 3)}


def _prefixed(prefix: str, sd: dict, fc: bool = False) -> dict:
    return {prefix + k: v for k, v in sd.items() if fc or not k.startswith("fc.")}


def _head(prefix: str) -> dict:
    return {f"{prefix}0.weight": torch.randn(8, 4), f"{prefix}0.bias": torch.randn(8)}


def _layouts(a: dict, b: dict) -> dict[str, tuple[dict, str, dict, dict | None]]:
    """name -> (checkpoint object with that repo's nesting, layout, evaluated weights, other weights)."""
    optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    return {
        # winci-ai/resa full checkpoint: base and momentum networks, projector and predictor
        "resa_full": ({"state_dict": {**_prefixed("module.encoder.", a), **_prefixed("module.momentum_encoder.", b),
                                      **_head("module.projector."), **_head("module.momentum_projector."),
                                      **_head("module.predictor.")}, "optimizer": optim, "epoch": 100},
                      "resa", b, a),
        # ReSSL: encoder_q (student) / encoder_k (EMA) = net + head, the memory queue
        "ressl": ({"model": {**_prefixed("module.encoder_q.net.", a), **_head("module.encoder_q.head.linear"),
                             **_prefixed("module.encoder_k.net.", b), **_head("module.encoder_k.head.linear"),
                             "module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1)},
                   "optimizer": optim, "epoch": 200}, "ressl", a, b),
        # DINO checkpoint.pth with a ResNet: both networks DDP-wrapped, args is an argparse.Namespace
        "dino": ({"student": {**_prefixed("module.backbone.", a), **_head("module.head.mlp.")},
                  "teacher": {**_prefixed("module.backbone.", b), **_head("module.head.mlp.")},
                  "optimizer": optim, "epoch": 100, "args": argparse.Namespace(arch="resnet18", lr=0.3),
                  "dino_loss": {"center": torch.zeros(1, 8)}}, "dino-scfs", b, a),
        # SCFS: torchextractor wraps the ResNet as .model; teacher not DDP-wrapped
        "scfs": ({"student": {**_prefixed("module.backbone.model.", a), **_head("module.head.mlp.")},
                  "teacher": {**_prefixed("backbone.model.", b), **_head("head.mlp.")}, "epoch": 200,
                  "args": argparse.Namespace(arch="resnet18")}, "dino-scfs", b, a),
        # MV-MR: PyTorch-Lightning checkpoint of SelfSupervisedModule (encoder = ResnetMultiProj, fc = Identity)
        "mvmr": ({"epoch": 9, "global_step": 100, "pytorch-lightning_version": "1.6.0",
                  "state_dict": {**_prefixed("encoder.backbone.", a), **_head("encoder.projector.")},
                  "optimizer_states": [optim], "lr_schedulers": []}, "mvmr", a, None),
        # INTL full checkpoint: module.backbone.* (with a classifier fc that is dropped), projector, optimizer
        "intl": ({"state_dict": {**_prefixed("module.backbone.", a, fc=True), **_head("module.projector.")},
                  "optimizer": optim, "epoch": 200}, "intl", a, None),
        # CW-RGP full checkpoint: module.model.* (the shared encoder)
        "cw_rgp": ({"state_dict": {**_prefixed("module.model.", a), **_head("module.head.")}, "epoch": 200},
                   "cw_rgp", a, None),
        # ReSA resa_resnet50_only_*.pth / INTL, CW-RGP resnet50.pth: the bare encoder
        "bare": (_prefixed("", a, fc=True), "backbone", a, None),
    }


def _assert_same(got: dict, want: dict) -> None:
    want = {k: v for k, v in want.items() if not k.startswith("fc.")}
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["resa_full", "ressl", "dino", "scfs", "mvmr", "intl", "cw_rgp", "bare"])
def test_layout_detected_and_mapped_completely(nets, tmp_path, name):
    obj, layout, evaluated, other = _layouts(nets["a"], nets["b"])[name]
    path = str(tmp_path / "ckpt.pth")
    torch.save(obj, path)
    imp = read_official(path)
    assert imp.layout.name == layout
    _assert_same(imp.evaluated, evaluated)
    if other is None:
        assert imp.other is None
    else:
        _assert_same(imp.other, other)
    timm_keys = set(timm.create_model("resnet18", num_classes=0).state_dict())
    assert set(imp.evaluated) == timm_keys  # no missing, no unexpected key
    assert imp.dropped == (["fc.bias", "fc.weight"] if name in ("intl", "bare") else [])


def _torchvision_features(arch: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    ref = getattr(torchvision.models, arch)()
    ref.load_state_dict(sd)
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        return ref.eval()(x)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_imported_timm_backbone_matches_torchvision(nets, tmp_path, arch):
    sd = nets["a"] if arch == "resnet18" else nets["r50"]
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"teacher": _prefixed("module.backbone.", sd), "student": _prefixed("module.backbone.", sd),
                "args": argparse.Namespace(arch=arch)}, path)
    imp = read_official(path)
    model = timm_backbone(imp.evaluated, None, path)
    assert model.default_cfg["architecture"] == arch
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _torchvision_features(arch, sd, x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flashssl_checkpoint_puts_each_network_in_its_slot(nets, tmp_path):
    """ReSA evaluates the momentum encoder (flashssl teacher slot); the online encoder goes to the student."""
    obj, *_ = _layouts(nets["a"], nets["b"])["resa_full"]
    path = str(tmp_path / "resa_resnet18_full.pth")
    torch.save(obj, path)
    res = import_checkpoint(path, str(tmp_path / "run"), overrides=["data.eval_size=64"])
    assert res["method"] == "resa" and res["max_abs_diff"] == 0.0
    method, cfg = load_method(res["out"])
    assert cfg.data.eval_size == 64 and cfg.model.backbone == "resnet18"
    _assert_same(method.teacher.backbone.state_dict(), nets["b"])
    _assert_same(method.student.backbone.state_dict(), nets["a"])
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        import_checkpoint(path, str(tmp_path / "run"))


def test_lightning_hyperparameters_of_a_missing_class_load_inertly(nets, tmp_path, monkeypatch):
    """Lightning pickles AttributeDict; without pytorch_lightning installed the checkpoint still loads."""
    mod = types.ModuleType("fake_lightning_parsing")

    AttributeDict = type("AttributeDict", (dict,), {"__module__": mod.__name__})
    mod.AttributeDict = AttributeDict
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    obj, *_ = _layouts(nets["a"], nets["b"])["mvmr"]
    obj["hyper_parameters"] = AttributeDict(config={"lr": 1e-4})
    path = str(tmp_path / "last.ckpt")
    torch.save(obj, path)
    monkeypatch.delitem(sys.modules, mod.__name__)
    assert read_official(path).layout.name == "mvmr"


def test_cli_writes_timm_file_and_names_unknown_layouts(nets, tmp_path, capsys):
    obj, *_ = _layouts(nets["a"], nets["b"])["dino"]
    path = str(tmp_path / "checkpoint.pth")
    torch.save(obj, path)
    out = str(tmp_path / "dino_teacher.safetensors")
    assert eval_cli.main(["import", "--checkpoint", path, "--out", out]) == 0
    assert "dino-scfs layout" in capsys.readouterr().out
    model = timm.create_model("resnet18", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=out, num_classes=0))
    _assert_same(model.state_dict(), nets["b"])  # the teacher
    # a flashssl checkpoint needs the method: DINO and SCFS share the layout
    assert eval_cli.main(["import", "--checkpoint", path, "--out", str(tmp_path / "x.pt")]) == 2
    assert "--method (dino or scfs)" in capsys.readouterr().err
    bad = str(tmp_path / "other.pth")
    torch.save({"net": _prefixed("encoder.", nets["a"]), "epoch": 3}, bad)
    assert eval_cli.main(["import", "--checkpoint", bad, "--out", str(tmp_path / "y.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "unknown checkpoint layout" in err and "top-level keys: net, epoch" in err and "Traceback" not in err
    torch.save({"state_dict": _prefixed("encoder.", nets["a"])}, bad)
    assert eval_cli.main(["import", "--checkpoint", bad, "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "state_dict holds 120 tensors with prefixes encoder.layer2. (30)" in capsys.readouterr().err
