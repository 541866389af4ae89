"""Every registered method learns the built-in dataset's classes through the real trainer.

One short run of each method's demo recipe (torchvision loader, 40 steps of 64 images per epoch) must stay finite
and lift weighted kNN (k=20, top-1, the method's evaluated weights) above a random-init backbone of the same
architecture and init by a margin measured on this machine. ``docs/results.md`` has the full-schedule numbers.
"""

import hashlib
import os

import pytest
import torch

from engine.config import CONFIG_DIR, load_config
from engine.setup import seed_everything
from engine.trainer import Trainer
from evaluation.knn_eval import knn_of_backbone
from methods import METHODS, build_method
from pipeline.convert.demo_dataset import ensure_demo_dataset
from pipeline.convert.digits_dataset import ensure_digits_dataset
from tests.conftest import ROOT

#: method -> (epochs, asserted margin in kNN points over random init). Measured with this test's exact settings,
#: demo data v3, trained vs random init, kNN@20 top-1 on the JPEG folders. On a 2-core AMX CPU (bf16): DINO 4 epochs
#: 48.8 vs 41.4 % (+7.4; 3 epochs at teacher momentum 0.95: -2.6); INTL 2 epochs 59.8 vs 41.4 % (+18.4); MV-MR 2 epochs
#: 45.4 vs 37.0 % (+8.4); ReSA 4 epochs 44.2 vs 37.0 % (+7.2; 3 epochs +4.2); ReSSL 3 epochs 49.6 vs 41.4 % (+8.2).
#: On a 2-core AMD CPU without AMX (fp32), where DINO, INTL, MV-MR, ReSA and ReSSL also pass: SCFS 4 epochs 44.4 vs
#: 41.4 % (+3.0; +9.4 on the AMX CPU); CW-RGP 1 epoch 49.6 vs 37.0 % (+12.6) with the demo recipe's Gram ridge
#: ssl.eps=1e-3 (without it a Gram eigenvalue vanished at step 4 and the ZCA gave NaN; in a second epoch the
#: embeddings fell to effective rank 2 and the eigendecomposition's gradient turned NaN at step 66). Runs repeat
#: exactly on one machine; each asserted margin is about half the smallest measured one.
LEARNING = {
    "cw_rgp": (1, 6.0),
    "dino": (4, 3.5),
    "intl": (2, 9.0),
    "mvmr": (2, 4.0),
    "resa": (4, 3.5),
    "ressl": (3, 4.0),
    "scfs": (4, 1.5),
}

#: Real images (issue #17): method -> (epochs, asserted margin) of its small-data recipe configs/exp/<m>_small.yaml on
#: scikit-learn's digit scans (pipeline/convert/digits_dataset.py, 32 px, 1,433 train / 364 val), batch 64, torchvision
#: loader. Measured with these exact settings (docs/small_data.md): DINO 1 epoch (22 steps) 95.6 vs 94.0 % (+1.6),
#: the collapse guard silent (teacher entropy 0.87 x log K, feature effective rank 47).
REAL_LEARNING = {
    "dino": (1, 0.8),
}

_RANDOM_INIT: dict[str, float] = {}


@pytest.fixture(scope="module")
def demo_root():
    return ensure_demo_dataset(os.path.join(ROOT, "data", "demo"))


def demo_config(name: str, demo_root: str, out_dir, epochs: int):
    exp = os.path.join(CONFIG_DIR, "exp", f"{name}_demo.yaml")
    assert os.path.exists(exp), f"every method needs a demo config: {exp}"
    return load_config(name, [exp], [
        "data.loader=torchvision", f"data.train_path={demo_root}/train", f"eval.train_dir={demo_root}/train",
        f"eval.val_dir={demo_root}/val", f"train.out_dir={out_dir}", f"train.epochs={epochs}", "train.log_every=1",
        "train.tensorboard=false", "train.ckpt_every=100000", "train.knn_at_end=false"])


def random_init_knn(cfg) -> float:
    """kNN@20 top-1 of the method's evaluated backbone at initialisation, computed once per distinct init (methods
    share it unless their init differs, e.g. zero-init residuals)."""
    seed_everything(cfg.train.seed)
    backbone = build_method(cfg).backbone_for_eval("auto")
    h = hashlib.sha1(str(cfg.data.eval_size).encode())
    for t in backbone.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    key = h.hexdigest()
    if key not in _RANDOM_INIT:
        res = knn_of_backbone(backbone, cfg, cfg.eval.train_dir, cfg.eval.val_dir, torch.device("cpu"))
        _RANDOM_INIT[key] = res["k20"]["top1"]
    return _RANDOM_INIT[key]


def test_every_method_has_a_learning_check():
    assert set(LEARNING) == set(METHODS) and set(REAL_LEARNING) <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_demo_recipe_learns(name, demo_root, tmp_path):
    epochs, margin = LEARNING[name]
    cfg = demo_config(name, demo_root, tmp_path, epochs)
    rand = random_init_knn(cfg)
    trainer = Trainer(cfg)
    state = trainer.fit()
    losses = torch.tensor([h["loss"] for h in state.history])
    assert state.step == trainer.total_steps == epochs * trainer.steps_per_epoch and trainer.steps_per_epoch >= 40
    assert len(losses) == state.step and torch.isfinite(losses).all(), losses
    for p in trainer.method.student.parameters():
        assert torch.isfinite(p).all()
    trained = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir,
                              trainer.device)["k20"]["top1"]
    print(f"{name}: {state.step} steps, kNN@20 top-1 trained {trained:.1f} %, random init {rand:.1f} %")
    assert trained >= rand + margin, (name, trained, rand, margin)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_LEARNING))
def test_small_recipe_learns_real_images(name, tmp_path):
    epochs, margin = REAL_LEARNING[name]
    root = ensure_digits_dataset(os.path.join(ROOT, "data", "digits"))
    exp = os.path.join(CONFIG_DIR, "exp", f"{name}_small.yaml")
    cfg = load_config(name, [exp], [
        "data.loader=torchvision", f"data.train_path={root}/train", f"eval.train_dir={root}/train",
        f"eval.val_dir={root}/val", f"train.out_dir={tmp_path}", f"train.epochs={epochs}", "data.batch_size=64",
        "train.log_every=2", "train.tensorboard=false", "train.ckpt_every=100000", "train.knn_at_end=false"])
    rand = random_init_knn(cfg)
    trainer = Trainer(cfg)
    state = trainer.fit()
    losses = torch.tensor([h["loss"] for h in state.history])
    assert state.step == epochs * trainer.steps_per_epoch and torch.isfinite(losses).all(), losses
    assert trainer.guard.reported == set(), f"{name}: the collapse guard tripped: {trainer.guard.reported}"
    trained = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir,
                              trainer.device)["k20"]["top1"]
    print(f"{name} (real images): {state.step} steps, kNN@20 top-1 trained {trained:.1f} %, random init {rand:.1f} %, "
          f"feature effective rank {state.history[-1]['feat_rank']:.1f}")
    assert trained >= rand + margin, (name, trained, rand, margin)
