"""ReSSL and ReSA end-to-end on a tiny ResNet-18: forward + backward + optimiser step + after_step, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import load_config
from methods import StepContext, build_method
from runtime.config_loader import ConfigError

STRONG = "jitter_p: 0.8, grayscale_p: 0.2, blur_p: 0.5"
WEAK = "jitter_p: 0.0, grayscale_p: 0.0, blur_p: 0.0, solarize_p: 0.0"


def _ressl_cfg(*extra: str):
    return load_config("ressl", [], ["model.backbone=resnet18", "ssl.queue_size=16", "ssl.proj_hidden_dim=32",
                                     "ssl.out_dim=8", "data.batch_size=4",
                                     f"data.views=[{{role: global, size: 32, {WEAK}}}, {{role: global, size: 32, "
                                     f"{STRONG}}}]", *extra])


def _resa_cfg(*extra: str):
    return load_config("resa", [], ["model.backbone=resnet18", "ssl.proj_hidden_dim=32", "ssl.out_dim=8",
                                    "ssl.pred_hidden_dim=16", "data.batch_size=4",
                                    f"data.views=[{{role: global, size: 32, {WEAK}}}, {{role: global, size: 32, "
                                    f"{STRONG}}}, {{role: local, size: 16, {STRONG}}}]", *extra])


def _params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _step(method, views, ctx):
    opt = torch.optim.SGD(method.student.parameters(), lr=0.1)
    out = method(views, 2, ctx)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    method.after_step(out, ctx)
    return out


def test_ressl_step_enqueues_keys_and_moves_teacher():
    method = build_method(_ressl_cfg()).train()
    assert float(method.student.backbone.layer1[0].bn2.weight.detach().min()) == 1.0  # zero-init off (official)
    assert method.eval_weights == "student"
    teacher0, queue0 = _params(method.teacher), method.loss.queue.clone()
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    out = _step(method, views, StepContext(0, 0, 10, 10))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    torch.testing.assert_close(method.loss.queue[:4], out.state["keys"])  # keys enqueued after the step
    assert torch.equal(method.loss.queue[4:], queue0[4:]) and int(method.loss.queue_ptr) == 4
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not torch.equal(_params(method.teacher), teacher0)  # EMA moved towards the updated student
    assert method.ema_momentum(StepContext(5, 0, 10, 10)) == 0.999  # constant


def test_ressl_five_crops_under_bf16_autocast():
    views = "[" + ", ".join([f"{{role: global, size: 32, {WEAK}}}", f"{{role: global, size: 32, {STRONG}}}"] +
                            [f"{{role: local, size: {s}, {STRONG}}}" for s in (28, 24, 20, 16)]) + "]"
    method = build_method(_ressl_cfg(f"data.views={views}")).train()
    crops = [torch.randn(4, 3, s, s) for s in (32, 32, 28, 24, 20, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(crops, 2, StepContext(0, 0, 1, 1))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert method.student.head[0].weight.grad is not None


def test_ressl_config_errors_and_weak_view_warning():
    with pytest.raises(ConfigError, match="ssl.queue_size: 18 must be a multiple"):
        _ressl_cfg("ssl.queue_size=18")
    with pytest.raises(ConfigError, match="ssl.shuffle_bn and model.sync_bn"):
        _ressl_cfg("model.sync_bn=true")
    with pytest.raises(ConfigError, match="ssl.teacher_temp"):
        _ressl_cfg("ssl.teacher_temp=0")
    with pytest.warns(UserWarning, match="should be weak"):
        _ressl_cfg(f"data.views=[{{role: global, count: 2, size: 32, {STRONG}}}]")


def test_resa_step_and_momentum_schedule():
    method = build_method(_resa_cfg()).train()
    assert method.teacher.predictor is None and method.student.predictor is not None
    assert float(method.student.backbone.layer1[0].bn2.weight.detach().abs().max()) == 0.0  # zero_init_residual on
    assert method.eval_weights == "teacher"
    teacher0 = _params(method.teacher)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    out = _step(method, views, StepContext(0, 0, 10, 10))
    assert torch.isfinite(out.loss)
    assert 0.0 <= float(out.logs["assign_self"]) <= 1.0
    assert not torch.equal(_params(method.teacher), teacher0)
    # after step t the EMA uses the official m_{t+1} = 1 - (1 - m0) (1 + cos(pi (t+1) / T)) / 2
    t, total = 3, 10
    expected = 1 - (1 - 0.996) * (1 + math.cos(math.pi * (t + 1) / total)) / 2
    assert method.ema_momentum(StepContext(t, 0, 10, total)) == pytest.approx(expected, rel=1e-12)
    assert method.ema_momentum(StepContext(total - 1, 0, 10, total)) == pytest.approx(1.0)


def test_resa_gradients_reach_online_side_only():
    method = build_method(_resa_cfg("ssl.per_view_bn=false")).train()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    method(views, 2, StepContext(0, 0, 1, 1)).loss.backward()
    assert method.student.predictor[0].weight.grad is not None
    assert method.student.backbone.conv1.weight.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())


def test_resa_config_errors():
    with pytest.raises(ConfigError, match="ssl.momentum_views"):
        _resa_cfg("ssl.momentum_views=4")
    with pytest.raises(ConfigError, match="ssl.sinkhorn_eps"):
        _resa_cfg("ssl.sinkhorn_eps=-1")
