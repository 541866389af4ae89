"""SCFS method smoke test on a tiny resnet18: forward + backward + optimizer step + after_step, and the wiring the
spec insists on (search key = teacher map of global crop 1, EMA over the shallow heads, both kinds of centers)."""

from __future__ import annotations

import pytest
import torch

import methods.scfs as scfs_module
from engine.config import load_config
from methods import StepContext, build_method
from runtime.config_loader import ConfigError

TINY = ["model.backbone=resnet18", "ssl.out_dim=64", "ssl.hidden_dim=32", "ssl.bottleneck_dim=16",
        "ssl.shallow_hidden_dim=32", "ssl.shallow_bottleneck_dim=16", "ssl.shallow_out_dim=16", "train.epochs=200",
        "data.views=[{role: global, count: 2, size: 32}, {role: local, count: 3, size: 16}]"]
B = 4


def _views(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + \
        [torch.randn(B, 3, 16, 16, generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def cfg():
    return load_config("scfs", [], TINY)


def test_step_trains_student_updates_teacher_and_centers(cfg, monkeypatch):
    torch.manual_seed(0)
    method = build_method(cfg)
    method.train()
    keys_seen = []
    real_search = scfs_module.searched_targets

    def spy(heads, queries, key_maps):
        keys_seen.append(key_maps)
        return real_search(heads, queries, key_maps)

    monkeypatch.setattr(scfs_module, "searched_targets", spy)
    stage_out = {}
    for k in (2, 3, 4):
        getattr(method.teacher.backbone, f"layer{k}").register_forward_hook(
            lambda mod, inp, out, k=k: stage_out.__setitem__(k, out))
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100)
    out = method(_views(), 2, ctx)
    assert torch.isfinite(out.loss)
    assert set(out.logs) >= {"loss_dino", "loss_shallow", "loss_layer2_local", "loss_layer4_global"}
    # the search keys are the teacher stage maps of global crop 1 only (first B rows of the global batch)
    for k, keys in zip((2, 3, 4), keys_seen[0]):
        assert keys.shape[0] == B and torch.equal(keys, stage_out[k][:B])
    out.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    for name in ("backbone", "head", "shallow_heads.0", "shallow_heads.2"):
        grads = [p.grad for n, p in method.student.named_parameters() if n.startswith(name) and p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    teacher_before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    with torch.no_grad():
        for p in method.student.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    method.after_step(out, ctx)
    m = method.ema_momentum(ctx)
    student = dict(method.student.named_parameters())
    for n, p in method.teacher.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[n] + (1 - m) * student[n])
    assert not torch.equal(teacher_before["shallow_heads.1.mlp.0.weight"],
                           method.teacher.state_dict()["shallow_heads.1.mlp.0.weight"])
    assert method.loss.center.abs().sum() > 0
    assert (method.shallow_loss.center.abs().sum(dim=1) > 0).all()
    state = method.state_dict()
    assert "shallow_loss.center" in state and "loss.center" in state
    assert method.backbone_for_eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert method.backbone_for_eval() is method.teacher.backbone


def test_teacher_temperature_is_per_epoch_linspace(cfg):
    method = build_method(cfg)

    def temp(epoch):
        return method.teacher_temp(StepContext(step=epoch * 10, epoch=epoch, steps_per_epoch=10, total_steps=2000))

    assert temp(0) == pytest.approx(0.04)
    assert temp(25) == pytest.approx(0.04 + 25 * 0.03 / 49)
    assert temp(49) == pytest.approx(0.07)
    assert temp(50) == temp(199) == pytest.approx(0.07)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.backbone.*vit_tiny_patch16_224"):
        load_config("scfs", [], TINY + ["model.backbone=vit_tiny_patch16_224"])
    with pytest.raises(ConfigError, match="data.views"):
        load_config("scfs", [], TINY + ["data.views=[{role: global, count: 2, size: 32}]"])
    with pytest.raises(ConfigError, match="ssl.shallow_stages"):
        load_config("scfs", [], TINY + ["ssl.shallow_stages=[2, 2]"])


@pytest.mark.parametrize("method_name, extra, expected_gamma", [
    ("dino", [], 1.0),  # official DINO/SCFS: torchvision resnet50() default init (timm would zero-init)
    ("scfs", [], 1.0),
    ("dino", ["ssl.zero_init_residual=true"], 0.0),
    ("mvmr", [], 0.0),  # official MV-MR encoder: resnet50(zero_init_residual=True)
])
def test_residual_block_init_follows_the_official_encoder(method_name, extra, expected_gamma):
    overrides = {"scfs": TINY, "dino": [o for o in TINY if not o.startswith("ssl.shallow")],
                 "mvmr": ["model.backbone=resnet18", "ssl.proj_hidden_dim=32", "ssl.proj_out_dim=32",
                          "ssl.representations=[]"]}[method_name]
    method = build_method(load_config(method_name, [], overrides + extra))
    last_bns = [blk.bn2.weight for layer in ("layer1", "layer2", "layer3", "layer4")
                for blk in getattr(method.student.backbone, layer)]
    assert len(last_bns) == 8
    assert all(torch.all(w == expected_gamma) for w in last_bns)
    if method.teacher is not None:  # the EMA teacher starts as the same network
        assert torch.equal(method.teacher.backbone.layer4[1].bn2.weight, method.student.backbone.layer4[1].bn2.weight)
