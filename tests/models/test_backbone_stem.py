"""model.stem=cifar: the small-image ResNet stem (3x3/1 conv, no max-pool) on a timm ResNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.detectron2_export import export_detectron2
from evaluation.export import export_backbone
from models.backbone import build_backbone
from models.config import ModelConfig
from runtime.config_loader import ConfigError
from tests.evaluation.conftest import save_tiny_checkpoint


def test_cifar_stem_keeps_the_resolution_into_layer1_and_changes_nothing_else():
    torch.manual_seed(0)
    imagenet = build_backbone(ModelConfig(backbone="resnet18"))
    torch.manual_seed(0)
    cifar = build_backbone(ModelConfig(backbone="resnet18", stem="cifar"))
    rest = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("conv1.")}
    assert rest.keys() == {k for k in cifar.state_dict() if not k.startswith("conv1.")}
    assert all(torch.equal(v, cifar.state_dict()[k]) for k, v in rest.items())  # same seed: same other weights
    x = torch.randn(2, 3, 32, 32)
    stem = cifar.act1(cifar.bn1(cifar.conv1(x)))
    assert isinstance(cifar.maxpool, nn.Identity) and stem.shape == (2, 64, 32, 32)
    assert cifar.conv1.weight.shape == (64, 3, 3, 3) and cifar.conv1.bias is None
    assert cifar.forward_features(x).shape == (2, 512, 4, 4)  # ImageNet stem: 1x1 at 32 px
    assert imagenet.forward_features(x).shape == (2, 512, 1, 1)
    assert cifar(x).shape == (2, 512)
    # Kaiming normal, fan-out, ReLU gain: std sqrt(2 / (64 * 9))
    assert float(cifar.conv1.weight.std()) == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)


def test_cifar_stem_on_a_network_without_a_resnet_stem_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.stem=cifar: 'vit_tiny_patch16_224' is not a ResNet"):
        build_backbone(ModelConfig(backbone="vit_tiny_patch16_224", stem="cifar"))


def test_exports_refuse_a_cifar_stem_backbone(tmp_path):
    ckpt = save_tiny_checkpoint(str(tmp_path / "c.pt"), overrides=["model.stem=cifar"])
    for export, out in ((export_backbone, "b.safetensors"), (export_detectron2, "b.pkl")):
        with pytest.raises(ValueError, match="model.stem=cifar"):
            export(ckpt, str(tmp_path / out))
        assert not (tmp_path / out).exists()
