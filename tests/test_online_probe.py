"""train.online_probe: learns from detached features, leaves SSL training bit-identical, resumes exactly."""

import json
import os

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.online_probe import OnlineProbe
from engine.trainer import Trainer
from runtime.config_loader import ConfigError
from tests.conftest import TINY_OVERRIDES


class Pooled(nn.Module):
    """Stands in for a backbone without ``global_pool``: the hook sits on the module itself; (B, 48) -> (B, 48)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_probe_learns_from_hooked_features_without_touching_them():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 48, generator=g) * 3
    backbone = Pooled()
    probe = OnlineProbe(backbone, 48, 4, rows=32, lr=1e-2, device=torch.device("cpu"))
    before = torch.get_rng_state()
    for step in range(60):
        labels = torch.randint(0, 4, (48,), generator=g)
        x = (means[labels] + torch.randn(48, 48, generator=g)).requires_grad_()
        probe.arm()
        backbone(x).sum().backward()  # the "SSL" backward: untouched by the probe
        assert torch.equal(x.grad, torch.ones_like(x))
        logs = probe.step(labels, read=step % 20 == 19)
        assert bool(logs) == (step % 20 == 19)
    assert logs["probe_top1"] > 90 and logs["probe_loss"] < 0.5  # window of the last 20 steps x 32 rows
    assert torch.equal(before, torch.get_rng_state())  # own generator: the global RNG stream is unchanged
    with pytest.raises(RuntimeError, match="no pooled"):
        probe.step(labels, read=False)  # not armed: no features kept


def _cfg(folder, out_dir, *extra):
    return load_config("dino", [], TINY_OVERRIDES + [
        "model.precision=fp32", f"data.train_path={folder}/train", f"eval.val_dir={folder}/val", "data.eval_size=32",
        f"train.out_dir={out_dir}", "train.epochs=2", "train.steps_per_epoch=2", "train.ckpt_every=2",
        "train.keep_last=10", *extra])


class Killed(Exception):
    pass


@pytest.mark.slow
def test_ssl_unchanged_by_probe_and_probe_resumes_exactly(tiny_folder, tmp_path, monkeypatch):
    plain = Trainer(_cfg(tiny_folder, tmp_path / "plain"))
    plain_hist = plain.fit().history
    probed = Trainer(_cfg(tiny_folder, tmp_path / "probe", "train.online_probe=true"))
    probed_hist = {h["step"]: h for h in probed.fit().history if "loss" in h}
    for (n, a), (_, b) in zip(plain.method.state_dict().items(), probed.method.state_dict().items()):
        assert torch.equal(a, b), n  # bitwise: student, teacher and DINO center
    assert [h["loss"] for h in probed_hist.values()] == [h["loss"] for h in plain_hist]
    assert all(0 <= h["probe_top1"] <= 100 for h in probed_hist.values())
    assert probed.method.student.backbone.training  # the epoch-end evaluation gave the train mode back
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "probe", "metrics.jsonl"))]
    assert [r["step"] for r in rows if "probe_top1" in r] == [1, 2, 3, 4]
    val = [r for r in rows if "probe_val_top1" in r]
    assert [r["step"] for r in val] == [2, 4] and all(0 <= r["probe_val_top1"] <= 100 for r in val)

    # killed after the step-2 checkpoint, resumed: the probe's head, optimiser and window continue exactly
    real_step = Trainer.train_step

    def dying_step(self, batch, ctx):
        if ctx.step == 3:
            raise Killed()
        return real_step(self, batch, ctx)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        Trainer(_cfg(tiny_folder, tmp_path / "cut", "train.online_probe=true")).fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(_cfg(tiny_folder, tmp_path / "cut", "train.online_probe=true", "train.resume=auto"))
    assert resumed.state.step == 2
    hist = {h["step"]: h for h in resumed.fit().history if "loss" in h}
    for step in (3, 4):
        assert (hist[step]["probe_top1"], hist[step]["probe_loss"]) == \
            (probed_hist[step]["probe_top1"], probed_hist[step]["probe_loss"])
    for k, v in probed.probe.head.state_dict().items():
        assert torch.equal(v, resumed.probe.head.state_dict()[k]), k


def test_online_probe_config_errors(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="online_probe_lr"):
        _cfg(tiny_folder, tmp_path, "train.online_probe_lr=0")
    with pytest.raises(ConfigError, match="model.compile=false"):
        Trainer(_cfg(tiny_folder, tmp_path, "train.online_probe=true", "model.compile=true"))
    with pytest.raises(ConfigError, match="eval.val_dir: .*nowhere.* does not exist"):
        Trainer(_cfg(tiny_folder, tmp_path, "train.online_probe=true", f"eval.val_dir={tmp_path}/nowhere"))
