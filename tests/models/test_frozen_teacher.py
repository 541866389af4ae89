"""Frozen teacher for MV-MR distillation: loads a local state dict, stays frozen/eval, stays out of checkpoints."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F

from models.frozen_teacher import FrozenTeacher, FrozenTeacherConfig, build_teacher_net
from runtime.config_loader import ConfigError


@pytest.fixture()
def saved(tmp_path):
    net = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "t.pt"
    torch.save(net.state_dict(), path)
    return net, str(path)


def test_loads_weights_and_matches_direct_forward(saved):
    net, path = saved
    teacher = FrozenTeacher(build_teacher_net(FrozenTeacherConfig("timm", "test_resnet", path)), input_size=48)
    x = torch.randn(3, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        ref = net(F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False))
    torch.testing.assert_close(teacher(x), ref)
    assert teacher(x).shape == (3, net.num_features) and not teacher(x).requires_grad


def test_wrapped_checkpoint_formats(saved, tmp_path):
    net, _ = saved
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, wrapped)
    loaded = build_teacher_net(FrozenTeacherConfig("timm", "test_resnet", str(wrapped)))
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_frozen_eval_and_hidden_from_the_module_tree(saved):
    _, path = saved
    teacher = FrozenTeacher(build_teacher_net(FrozenTeacherConfig("timm", "test_resnet", path)))
    teacher.train()
    assert not teacher.net.training
    assert teacher.state_dict() == {} and list(teacher.parameters()) == []
    assert all(not p.requires_grad for p in teacher.net.parameters())
    teacher.to(torch.float64)  # .to / .cuda / channels_last reach the hidden network
    assert all(p.dtype == torch.float64 for p in teacher.net.parameters())


@pytest.mark.parametrize("cfg_kwargs, needles", [
    ({"num_classes": 7}, ["ssl.teacher.checkpoint", "num_classes", "unexpected", "missing"]),
    ({"name": "not_a_model"}, ["ssl.teacher.name", "not_a_model"]),
    ({"checkpoint": "/nonexistent/teacher.pt"}, ["ssl.teacher.checkpoint", "not found"]),
])
def test_bad_teacher_config_names_the_key(saved, cfg_kwargs, needles):
    _, path = saved
    kwargs = {"kind": "timm", "name": "test_resnet", "checkpoint": path, **cfg_kwargs}
    with pytest.raises(ConfigError) as e:
        build_teacher_net(FrozenTeacherConfig(**kwargs))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_corrupt_file_and_download_names_are_rejected(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load"):
        build_teacher_net(FrozenTeacherConfig("timm", "test_resnet", str(bad)))
    with pytest.raises(ConfigError, match="download"):
        FrozenTeacherConfig("open_clip", "hf-hub:laion/CLIP-ViT-B-16", str(bad))
    with pytest.raises(ConfigError, match="ssl.teacher.name"):
        FrozenTeacherConfig("timm", "", str(bad))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_open_clip_missing_is_a_clear_error(tmp_path):
    f = tmp_path / "clip.bin"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="open_clip"):
        build_teacher_net(FrozenTeacherConfig("open_clip", "ViT-B-16", str(f)))
