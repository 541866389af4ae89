"""Collapse monitor: the statistics against float64 formulas, the hook, and the trainer logging them."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from engine.collapse import CollapseMonitor, effective_rank, normalized_std
from engine.config import load_config
from engine.trainer import Trainer
from tests.conftest import TINY_OVERRIDES


def _reference_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised squared singular values of the centred matrix, in float64."""
    x = x.double()
    x = x - x.mean(0)
    eig = torch.linalg.svdvals(x) ** 2
    p = eig / eig.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def test_effective_rank_matches_the_float64_formula_and_known_ranks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 20, generator=g) * torch.linspace(0.1, 3.0, 20)
    assert abs(float(effective_rank(x)) - _reference_rank(x)) < 1e-4 * _reference_rank(x)
    # r orthogonal directions with equal energy -> exactly r
    basis = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))[0]  # (20, 3) orthonormal columns
    signs = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)  # centred, orthogonal
    x3 = (signs @ basis.T).repeat(5, 1)  # (20, 20), rank 3, equal singular values
    assert abs(float(effective_rank(x3)) - 3.0) < 1e-5
    assert float(effective_rank(torch.ones(16, 8))) == 1.0  # constant features: fully collapsed
    assert math.isnan(float(effective_rank(torch.full((4, 3), float("inf")))))


def test_normalized_std_is_zero_when_collapsed_and_matches_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g)
    z = x.double() / x.double().norm(dim=1, keepdim=True)
    expected = float(torch.sqrt(((z - z.mean(0)) ** 2).sum(0) / (z.shape[0] - 1)).mean())
    assert abs(float(normalized_std(x)) - expected) < 1e-6
    assert float(normalized_std(torch.ones(8, 4) * 3)) == pytest.approx(0.0, abs=1e-7)


def test_monitor_sees_only_armed_steps_first_call_and_the_scfs_entry_point():
    backbone = timm.create_model("resnet18", num_classes=0).eval()
    mon = CollapseMonitor(backbone, rows=4)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        backbone(x)
        assert mon.stats() == {}  # not armed: nothing kept
        mon.arm()
        first = backbone(x)
        backbone(torch.zeros(6, 3, 32, 32))  # a second call (e.g. the local crops) does not replace the first
    stats = mon.stats()
    assert float(stats["feat_rank"]) == pytest.approx(float(effective_rank(first[:4])))
    assert mon.stats() == {}  # disarmed after reading
    mon.arm()
    with torch.no_grad():  # SCFS calls forward_intermediates + forward_head, not backbone(x)
        final, _ = backbone.forward_intermediates(x, indices=[2])
        backbone.forward_head(final, pre_logits=True)
    assert set(mon.stats()) == {"feat_rank", "feat_std"}
    mon.close()


def test_trainer_logs_the_statistics_at_every_log_step(tiny_folder, tmp_path):
    cfg = load_config("dino", [], TINY_OVERRIDES + [
        f"data.train_path={tiny_folder}/train", f"train.out_dir={tmp_path}", "train.epochs=1",
        "train.steps_per_epoch=3", "train.log_every=2"])
    history = Trainer(cfg).fit().history
    assert [h["step"] for h in history] == [2, 3]  # every log_every steps and the last one
    for h in history:
        assert 1.0 <= h["feat_rank"] <= cfg.data.batch_size
        assert 0.0 < h["feat_std"] <= 1.0
