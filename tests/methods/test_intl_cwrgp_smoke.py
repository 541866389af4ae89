"""INTL (+ EMA variant) and CW-RGP end-to-end on a tiny ResNet-18: forward + backward + optimiser step + after_step,
architecture details from the specs, EMA schedule, resumable random partitions, config checks."""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from methods import StepContext, build_method
from optim.schedules import ema_momentum
from runtime.config_loader import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny convolutions: extra threads only contend

VIEW = "{role: global, size: 32, blur_p: 0.0}"


def _intl_cfg(*extra: str):
    return load_config("intl", [], ["model.backbone=resnet18", "ssl.proj_hidden_dim=32", "ssl.emb_dim=16",
                                    "data.batch_size=6", f"data.views=[{VIEW}, {VIEW}, {{role: local, size: 16}}]",
                                    *extra])


def _cw_cfg(*extra: str):
    return load_config("cw_rgp", [], ["model.backbone=resnet18", "ssl.head_hidden_dim=32", "ssl.emb_dim=16",
                                      "ssl.groups=2", "ssl.w_size=4", "data.batch_size=8",
                                      "data.views=[{role: global, count: 4, size: 32}]", *extra])


def _views(n, b, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes][:n]


def _params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _step(method, views, ctx):
    opt = torch.optim.SGD(method.student.parameters(), lr=0.05)
    out = method(views, 2, ctx)
    opt.zero_grad()
    out.loss.backward()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.student.parameters())
    opt.step()
    method.after_step(out, ctx)
    return out, grads_ok


def test_intl_symmetric_step():
    method = build_method(_intl_cfg()).train()
    assert method.teacher is None and method.eval_weights == "student"
    proj = method.student.head
    assert proj[0].bias is None and proj[-1].bias is not None and isinstance(proj[-2], torch.nn.ReLU)  # spec §2.1
    before = _params(method.student)
    ctx = StepContext(0, 0, 10, 20)
    out, grads_ok = _step(method, _views(3, 6, [32, 32, 16]), ctx)
    assert torch.isfinite(out.loss) and grads_ok
    assert not torch.equal(before, _params(method.student))
    assert float(out.logs["trade_off"]) == pytest.approx(0.01 * (torch.log2(torch.tensor(6.0)).item() - 3))


def test_intl_ema_variant_target_is_view0_and_teacher_follows_schedule():
    method = build_method(_intl_cfg("ssl.ema=true", "ssl.trade_off=0.05")).train()
    assert method.teacher is not None
    ctx = StepContext(4, 0, 10, 20)
    views = _views(3, 6, [32, 32, 16])
    t0 = _params(method.teacher)
    out, grads_ok = _step(method, views, ctx)
    assert torch.isfinite(out.loss) and grads_ok
    assert all(p.grad is None for p in method.teacher.parameters())
    m = ema_momentum(ctx.step + 1, ctx.total_steps, 0.996)  # upstream m(t+1) at the start of step t+1
    torch.testing.assert_close(_params(method.teacher), m * t0 + (1 - m) * _params(method.student))
    # view 0 goes only through the teacher, views 1.. only through the student (spec §2.3)
    seen = {"student": [], "teacher": []}
    for name in seen:
        getattr(method, name).backbone.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].shape[-1]))
    method(_views(3, 6, [40, 32, 16]), 2, ctx)
    assert seen == {"student": [32, 16], "teacher": [40]}


def test_intl_zero_init_and_per_resolution_path():
    method = build_method(_intl_cfg("ssl.zero_init_residual=false", "ssl.bn_per_view=false")).train()
    assert float(method.student.backbone.layer1[0].bn2.weight.detach().min()) == 1.0
    out = method(_views(3, 6, [32, 32, 16]), 2, StepContext(0, 0, 10, 20))
    assert torch.isfinite(out.loss)


def test_cw_rgp_step_and_resumable_partitions():
    cfg = _cw_cfg("ssl.cov_weight=0.01", "ssl.cov_stop_epochs=1")
    method = build_method(cfg).train()
    head = method.student.head
    assert head[0].bias is not None and isinstance(head[1], torch.nn.BatchNorm1d) and head[-1].out_features == 16
    views = _views(4, 8, [32] * 4)
    ctx = StepContext(3, 0, 10, 20)
    with torch.no_grad():
        a = method(views, 4, ctx).loss
        twin = build_method(cfg).train()
        twin.load_state_dict(method.state_dict())
        same = twin(views, 4, ctx).loss  # a resumed run redraws the same partitions at the same step
        other = method(views, 4, StepContext(4, 0, 10, 20)).loss
    torch.testing.assert_close(a, same)
    assert not torch.equal(a, other)
    out, grads_ok = _step(method, views, ctx)
    assert torch.isfinite(out.loss) and grads_ok and "cov" in out.logs
    assert "cov" not in method(views, 4, StepContext(10, 1, 10, 20)).logs  # off from cov_stop_epochs on


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="ssl.w_size"):
        _cw_cfg("data.batch_size=6")
    with pytest.raises(ConfigError, match="ssl.w_size"):
        _cw_cfg("ssl.w_size=16")
    with pytest.raises(ConfigError, match="data.views"):
        _cw_cfg("data.views=[{role: global, size: 32}]")
    with pytest.raises(ConfigError, match="ssl.axis"):
        _intl_cfg("ssl.axis=2")
    with pytest.raises(ConfigError, match="ssl.momentum"):
        _intl_cfg("ssl.momentum=1.0")
