"""Linear probes really train: standard (image loader) and fast (cached features) on linearly separable data;
schedule against its formula; two gloo ranks (DDP head, all-reduced counts) == one process on the same batches."""

import math

import pytest
import torch

from evaluation.config import PROTOCOLS, LinearConfig, load_linear_config
from evaluation.fast_probe import train_on_features
from evaluation.features import FrozenBackbone, embed_split
from evaluation.linear import LinearHead, lr_at, train_linear_probe
from runtime.config_loader import ConfigError
from tests.dist_helpers import run_distributed
from tests.evaluation.conftest import FlatBackbone, TensorLoader, TensorSplit, separable_images

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _frozen() -> FrozenBackbone:
    return FrozenBackbone(FlatBackbone(), torch.device("cpu"), MEAN, STD)


def _cfg(**kw) -> LinearConfig:
    base = dict(protocol="ressl", epochs=6, batch_size=32, lr=0.3, eval_every=1)
    return LinearConfig(**{**base, **kw})


def test_standard_probe_learns_separable_data():
    x, y = separable_images(256)
    vx, vy = separable_images(64, seed=0)  # same class means, fresh noise (seed + 1 noise differs by n)
    res = train_linear_probe(_frozen(), TensorLoader(x, y, 32), TensorSplit(vx, vy), 4, _cfg(), eval_batch_size=16)
    assert len(res["epochs"]) == 6 and res["last"]["epoch"] == 5
    assert res["epochs"][-1]["train_loss"] < res["epochs"][0]["train_loss"]
    assert res["best"]["top1"] >= 95.0 and res["best"]["top1"] == max(r["top1"] for r in res["epochs"])


def test_untrained_head_is_near_chance():
    """Guards the check above: the accuracy comes from training, not from the data alone."""
    vx, vy = separable_images(64)
    head = LinearHead(48, 4)
    with torch.no_grad():
        head.linear.weight.zero_()
    acc = (head(_frozen()(vx)).argmax(1) == vy).float().mean().item()
    assert acc <= 0.3


@pytest.mark.parametrize("head_norm", ["none", "bn"])
def test_fast_probe_learns_separable_features(head_norm):
    x, y = separable_images(512)
    vx, vy = separable_images(128)
    f = _frozen()
    cfg = _cfg(head_norm=head_norm)
    cfg.fast.epochs, cfg.fast.batch_size, cfg.fast.lr_grid = 10, 64, (0.1, 1.0)
    res = train_on_features(f(x), y, f(vx), vy, 4, cfg)
    assert set(res["heads"]) == {"lr_x0.1", "lr_x1"}
    assert res["best"] == res["heads"]["lr_x1"]["best"]  # the protocol head is the x1 one
    assert res["best"]["top1"] >= 95.0
    assert res["best_of_grid"]["top1"] == max(h["best"]["top1"] for h in res["heads"].values())


def test_lr_schedule_matches_formula():
    cfg = _cfg(epochs=10, warmup_epochs=2)
    spe, peak = 7, 0.5
    for step in range(0, 70, 3):
        if step < 14:
            ref = peak * step / 14
        else:
            ref = 0.5 * peak * (1 + math.cos(math.pi * (step - 14) / 56))
        assert lr_at(step, spe, cfg, peak) == pytest.approx(ref)
    step_cfg = _cfg(epochs=10, schedule="step", milestones=(6, 8))
    assert [lr_at(s * spe, spe, step_cfg, 1.0) for s in (0, 5, 6, 7, 8, 9)] == pytest.approx([1, 1, .1, .1, .01, .01])


def test_config_presets_and_overrides():
    assert load_linear_config("dino").lr == PROTOCOLS["dino"]["lr"]
    assert load_linear_config("scfs").batch_size == PROTOCOLS["dino"]["batch_size"]
    assert load_linear_config("ressl").lr == 0.3
    with pytest.raises(ConfigError, match="protocol=auto: unknown method 'unknown_method'"):  # no silent fallback
        load_linear_config("unknown_method")
    cfg = load_linear_config("dino", overrides=["protocol=resa", "epochs=3", "fast.copies=2"])
    assert (cfg.protocol, cfg.schedule, cfg.lr, cfg.epochs, cfg.fast.copies) == ("resa", "step", 10.0, 3, 2)
    assert load_linear_config("dino", overrides=["lr=0.5"]).lr == 0.5  # CLI beats the preset
    for bad in (["lr=-1"], ["nope=1"], ["protocol=mine"], ["fast.copies=-1"], ["schedule=linear"]):
        with pytest.raises(ConfigError):
            load_linear_config("dino", overrides=bad)


# ------------------------------------------------------------------ distributed equivalence
def _probe_on_ranks(rank, world, tmpdir):
    torch.manual_seed(0)
    x, y = separable_images(96)
    vx, vy = separable_images(31, noise=400.0)  # noisy: accuracy between chance and 100 %; 31 = uneven shards
    split = TensorSplit(vx, vy)
    feats, labels = embed_split(_frozen(), split, batch_size=4)
    res = train_linear_probe(_frozen(), TensorLoader(x, y, 16 // world, rank, world), split, 4,
                             _cfg(epochs=2, batch_size=16), eval_batch_size=7)
    return feats, labels, res


@pytest.mark.dist
def test_two_ranks_equal_one_process():
    torch.manual_seed(0)
    single = _probe_on_ranks(0, 1, None)
    ranks = run_distributed(_probe_on_ranks, 2)
    assert 30 < single[2]["last"]["top1"] < 100
    for feats, labels, res in ranks:
        torch.testing.assert_close(feats, single[0])  # gathered back into dataset order
        assert torch.equal(labels, single[1])
        for a, b in zip(res["epochs"], single[2]["epochs"]):
            assert a["top1"] == pytest.approx(b["top1"]) and a["top5"] == pytest.approx(b["top5"])
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
