"""eval.py export: plain timm loads the .safetensors file and computes identical features."""

import timm
import torch
from safetensors import safe_open

import eval as eval_cli
from evaluation.export import export_backbone, load_exported
from evaluation.load import load_backbone
from tests.evaluation.conftest import save_tiny_checkpoint


def _features(model, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def test_roundtrip_identical_features(tiny_ckpt, tmp_path):
    out = str(tmp_path / "backbone.safetensors")
    meta = export_backbone(tiny_ckpt, out)
    assert meta["architecture"] == "resnet18" and meta["weights"] == "teacher" and meta["method"] == "dino"
    # what a user writes, without flashssl: timm + the file
    model = timm.create_model("resnet18", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=out, num_classes=0))
    ref, _ = load_backbone(tiny_ckpt)
    assert torch.equal(_features(model), _features(ref))
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == set(ref.state_dict())  # exactly the backbone: no heads, no classifier
        assert f.metadata()["step"] == "3"
    # a model with a new 10-class classifier: same trunk, freshly initialised fc
    model10 = load_exported(out, num_classes=10)
    assert model10.get_classifier().out_features == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model10.eval().forward_head(model10.forward_features(x), pre_logits=True), ref(x))


def test_weights_choice_is_exported(tmp_path):
    """The DINO teacher is a copy of the student at init; perturb the student to make the choice observable."""
    from evaluation.load import method_from_checkpoint
    from runtime.checkpoint import atomic_save, load_checkpoint

    ckpt = save_tiny_checkpoint(str(tmp_path / "c.pt"))
    state = load_checkpoint(ckpt)
    state["model"] = {k: (v + 0.01 if k.startswith("student.") and v.is_floating_point() else v)
                      for k, v in state["model"].items()}
    atomic_save(state, ckpt)
    out = str(tmp_path / "s.safetensors")
    assert export_backbone(ckpt, out, "student")["weights"] == "student"
    method, _, _ = method_from_checkpoint(ckpt)
    got = _features(load_exported(out))
    assert torch.equal(got, _features(method.student.backbone))
    assert not torch.allclose(got, _features(method.teacher.backbone))


def test_vit_file_loads_in_timm(tmp_path):
    """timm's ViT loader runs a checkpoint filter on the state dict: our layout must pass through it unchanged."""
    from safetensors.torch import save_file

    from evaluation.export import backbone_tensors

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, dynamic_img_size=True)  # as models/backbone.py
    out = str(tmp_path / "vit.safetensors")
    save_file(backbone_tensors(vit), out, metadata={"architecture": "vit_tiny_patch16_224"})
    assert torch.equal(_features(load_exported(out), 224), _features(vit, 224))


def test_cli_export_verifies_and_rejects_bad_suffix(tiny_ckpt, tmp_path, capsys):
    assert eval_cli.main(["export", "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert ".safetensors" in err and "Traceback" not in err
    assert eval_cli.main(["export", "--checkpoint", tiny_ckpt, "--out", str(tmp_path / "x.safetensors")]) == 0
    assert "verified" in capsys.readouterr().out
