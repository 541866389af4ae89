"""MV-MR method: a training step on a tiny model, the config contract, the exp configs, the distillation variant."""

from __future__ import annotations

import os

import pytest
import timm
import torch

from engine.config import CONFIG_DIR, load_config
from methods import StepContext, build_method
from optim.build import apply_schedules, build_optimizer
from runtime.config_loader import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # kymatio's many tiny ops crawl on spinning threads

VIEWS = ("data.views=[{role: global, size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, "
         "grayscale_p: 0.0}, {role: global, size: 32, scale: [0.2, 1.0]}]")
TINY = ["model.backbone=resnet18", "ssl.proj_hidden_dim=64", "ssl.proj_out_dim=48", "data.batch_size=4",
        "model.precision=fp32", VIEWS]
CTX = StepContext(step=3, epoch=0, steps_per_epoch=10, total_steps=100)


def _views(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g)]


def test_train_step_finite_loss_grads_and_update():
    cfg = load_config("mvmr", [], TINY)
    method = build_method(cfg).train()
    assert method.teacher is None and method.frozen_teacher is None
    opt = build_optimizer(method.student, cfg.optim, "cpu")
    assert isinstance(opt, torch.optim.Adam)
    apply_schedules(opt, cfg.optim, CTX.step, CTX.total_steps, CTX.steps_per_epoch, 4)
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    out = method(_views(), 2, CTX)
    assert torch.isfinite(out.loss)
    assert set(out.logs) == {"mse", "std", "dc_zz", "dc_full_img", "dc_full_img_scatnet", "dc_full_img_augment",
                             "dc_full_img_hog", "dc_full_img_std"}
    torch.testing.assert_close(sum(out.logs.values()), out.loss.detach())
    out.loss.backward()
    for name, p in method.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    method.after_step(out, CTX)
    after = method.student.state_dict()
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])
    assert after["head.1.num_batches_tracked"] == before["head.1.num_batches_tracked"] + 2  # two passes, own BN batch
    assert all(k.startswith("student.") for k in method.state_dict())


def test_projector_is_bias_free_bn_relu_mlp():
    method = build_method(load_config("mvmr", [], TINY))
    kinds = [type(m).__name__ for m in method.student.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in method.student.head if isinstance(m, torch.nn.Linear))
    assert method.student.head[-1].out_features == 48
    default = load_config("mvmr")
    assert (default.ssl.proj_hidden_dim, default.ssl.proj_out_dim, default.ssl.proj_layers) == (8192, 8192, 3)


def test_views_are_taken_by_index_original_first():
    cfg = load_config("mvmr", [], TINY)
    method = build_method(cfg).train()
    seen = []
    method.targets = lambda x_o, step: seen.append(x_o) or {}
    views = _views()
    method(views, 2, CTX)
    assert seen[0] is views[0]
    flipped = load_config("mvmr", [], TINY[:-1] + [
        "data.views=[{role: global, size: 32, scale: [0.2, 1.0]}, {role: global, size: 32, scale: [1.0, 1.0], "
        "ratio: [1.0, 1.0], flip_p: 0.0, jitter_p: 0.0, grayscale_p: 0.0}]", "ssl.original_view=1"])
    method = build_method(flipped).train()
    method.targets = lambda x_o, step: seen.append(x_o) or {}
    method(views, 2, CTX)
    assert seen[1] is views[1]


@pytest.mark.parametrize("override, needles", [
    ("data.views=[{role: global, size: 32, scale: [1.0, 1.0], ratio: [1.0, 1.0]}, {role: global, size: 32}]",
     ["data.views", "original view", "flip_p=0.5", "jitter_p=0.8"]),
    ("data.views=[{role: global, size: 32}, {role: global, size: 32}, {role: global, size: 32}]",
     ["data.views", "exactly 2"]),
    ("ssl.representations=[full_img, full_img_dct]", ["ssl.representations", "full_img_dct"]),
    ("ssl.original_view=2", ["ssl.original_view"]),
    ("ssl.handcrafted_sign=maximise", ["ssl.handcrafted_sign", "'code'", "'paper'"]),
    ("ssl.teacher={kind: timm, name: resnet18}", ["ssl.teacher.checkpoint"]),
])
def test_bad_config_names_the_key(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config("mvmr", [], TINY + [override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("name", ["mvmr_in1k", "mvmr_clip_in1k", "mvmr_demo"])
def test_exp_configs_load(name):
    cfg = load_config("mvmr", [os.path.join(CONFIG_DIR, "exp", f"{name}.yaml")])
    assert cfg.data.n_global == 2 and cfg.optim.name == "adam" and not cfg.model.sync_bn
    if name == "mvmr_clip_in1k":
        assert cfg.ssl.representations == [] and cfg.ssl.teacher.kind != "none"
    else:
        assert len(cfg.ssl.representations) == 5 and cfg.ssl.teacher.kind == "none"


def test_distillation_variant_with_a_local_random_teacher(tmp_path):
    path = str(tmp_path / "teacher.pt")
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    # scale 1: the random test_resnet's features are ~100x smaller than a trained teacher's, so the default clamp
    # (1e-4 * 32**2 on squared distances) would flatten every distance and leave dCor undefined (NaN)
    teacher = f"ssl.teacher={{kind: timm, name: test_resnet, checkpoint: {path}, scale: 1.0}}"
    cfg = load_config("mvmr", [], TINY + ["ssl.representations=[]", "ssl.teacher.input_size=40", teacher])
    method = build_method(cfg).train()
    assert not method.frozen_teacher.net.training  # stays in eval mode under method.train()
    out = method(_views(), 2, CTX)
    assert set(out.logs) == {"mse", "std", "dc_zz", "dc_teacher"}
    assert 0.0 <= float(out.logs["dc_teacher"]) <= 1.0  # maximised: 1 - dCor
    out.loss.backward()
    assert all(p.grad is None for p in method.frozen_teacher.net.parameters())
    assert all(k.startswith("student.") for k in method.state_dict())  # teacher weights stay out of checkpoints
    opt_params = {id(p) for g in build_optimizer(method.student, cfg.optim, "cpu").param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in method.frozen_teacher.net.parameters()}
