"""SCFS shallow head and the SCFS network: stage maps from one timm pass, pooled feature, multi-resolution views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.backbone import build_backbone
from models.config import ModelConfig
from models.heads import DINOHead
from models.scfs_heads import DINOShallowHead, SCFSNet, stage_indices


def test_shallow_head_is_residual_bottleneck_then_normalised_mlp():
    head = DINOShallowHead(12, bottleneck_dim=5, hidden_dim=16, out_dim=7)
    x = torch.relu(torch.randn(6, 12, 4, 4))
    out = head(x)
    assert out.shape == (6, 7)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    convs = [m for m in head.block if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(12, 5, (1, 1)), (5, 5, (3, 3)),
                                                                               (5, 12, (1, 1))]
    assert all(c.bias is None for c in convs)
    # with the residual branch's last BN zeroed the head reduces to normalise(mlp(mean(relu(x)))) = identity shortcut
    nn.init.zeros_(head.block[-1].weight)
    expected = nn.functional.normalize(head.mlp(torch.relu(x).mean(dim=(2, 3))), dim=-1)
    torch.testing.assert_close(head(x), expected)


def _net(stages=(2, 3, 4)) -> SCFSNet:
    backbone = build_backbone(ModelConfig(backbone="resnet18"))
    return SCFSNet(backbone, DINOHead(512, 32, 16, 8), stages, bottleneck_dim=8, hidden_dim=16, out_dim=8)


def test_stage_maps_and_pooled_feature_come_from_one_pass():
    net = _net().eval()
    seen = {}
    hooks = [getattr(net.backbone, f"layer{k}").register_forward_hook(
        lambda mod, inp, out, k=k: seen.__setitem__(k, out)) for k in (2, 3, 4)]
    x = torch.randn(2, 3, 64, 64)
    pooled, maps = net.forward_stages(x)
    for h in hooks:
        h.remove()
    assert [m.shape for m in maps] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    for k, m in zip((2, 3, 4), maps):
        assert m is seen[k]  # the stage outputs themselves, from the same pass
    torch.testing.assert_close(pooled, net.backbone(x))  # exactly what evaluation sees


def test_forward_views_groups_resolutions_and_keeps_view_order():
    net = _net((3, 4)).eval()
    views = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    out = net.forward_views(views)
    assert out.logits.shape == (3, 2, 32)
    assert [s.shape for s in out.shallow] == [(3, 2, 8), (3, 2, 8)]
    assert [p.shape for p in out.pooled] == [(3, 2, 256), (3, 2, 512)]
    for v, x in enumerate(views):
        logits, shallow, maps = net(x)
        torch.testing.assert_close(out.logits[v], logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.shallow[1][v], shallow[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.pooled[0][v], maps[0].mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
        if v == 0:
            torch.testing.assert_close(out.first_maps[1], maps[1], rtol=1e-4, atol=1e-5)
    assert not out.pooled[0].requires_grad and out.logits.requires_grad


def test_stage_indices_reject_non_resnet():
    vit = build_backbone(ModelConfig(backbone="vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="no ResNet stages layer2"):
        stage_indices(vit, (2, 3, 4))
    assert stage_indices(build_backbone(ModelConfig(backbone="resnet18")), (2, 4)) == [2, 4]


def test_compile_backbone_compiles_the_entry_point_scfs_uses(monkeypatch):
    net = _net().eval()
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    net.compile_backbone()
    assert compiled and compiled[0].__func__ is SCFSNet.forward_stages  # not backbone.forward, which SCFS never calls
