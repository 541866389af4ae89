"""Every registered method's demo recipe trains on the built-in dataset through the real trainer without non-finite
values, and its checkpoint evaluates with kNN. The CW-RGP and MV-MR demo recipes must also lift kNN above a random-init
backbone by a margin measured on this machine (the real learning check). DINO, SCFS, ReSSL and ReSA do not reach a
clear margin in a CI-sized CPU budget on this data (README, "Demo results", has every method's measured demo kNN).
"""

import os

import pytest
import torch

from evaluation.knn_eval import knn_of_backbone
from methods import METHODS, build_method
from pipeline.demo_dataset import ensure_demo_dataset
from runtime.config import CONFIG_DIR, load_config
from runtime.setup import seed_everything
from runtime.trainer import Trainer
from tests.conftest import ROOT

STEPS = 12


@pytest.fixture(scope="module")
def demo_root():
    return ensure_demo_dataset(os.path.join(ROOT, "data", "demo"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_demo_recipe_trains_finite(name, demo_root, tmp_path):
    exp = os.path.join(CONFIG_DIR, "exp", f"{name}_demo.yaml")
    assert os.path.exists(exp), f"every method needs a demo config: {exp}"
    cfg = load_config(name, [exp], [
        "data.loader=torchvision", f"data.train_path={demo_root}/train", f"eval.train_dir={demo_root}/val",
        f"eval.val_dir={demo_root}/val",
        f"train.out_dir={tmp_path}", "train.epochs=2", f"train.steps_per_epoch={STEPS // 2}", "train.log_every=1",
        "train.tensorboard=false", "train.ckpt_every=100000", "data.workers=1"])
    trainer = Trainer(cfg)
    state = trainer.fit()
    losses = torch.tensor([h["loss"] for h in state.history])
    assert state.step == STEPS and len(losses) == STEPS and torch.isfinite(losses).all(), losses
    for p in trainer.method.student.parameters():
        assert torch.isfinite(p).all()
    res = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir,
                          trainer.device)
    assert 0.0 <= res["k20"]["top1"] <= 100.0


#: (method, epochs, asserted margin in points) whose demo recipe learns clearly within a CI budget. Measured with this
#: test's exact settings (torchvision loader, kNN k=20 top-1, trained vs random init):
#: CW-RGP 4 epochs 44.6 vs 19.6 % (+25.0, 159 s alone); CW-RGP 2 epochs 24.8 vs 19.6 %;
#: MV-MR (paper's dCor sign, its demo recipe) 3 epochs 25.8 vs 19.6 % (+6.2; the FFCV demo run, kNN on the .beton
#: copies, gave 26.0 vs 20.6 % at the same step and rose steadily 22.2 -> 26.4 % over 240 steps);
#: INTL 3 epochs 30.6 vs 24.0 % (+6.6, not asserted: one learner per loss family keeps the suite under its time
#: budget). Each asserted margin is about half the measured one.
LEARNERS = [("cw_rgp", 4, 12.0), ("mvmr", 3, 3.0)]


@pytest.mark.slow
@pytest.mark.parametrize("name,epochs,margin", LEARNERS)
def test_demo_recipe_beats_random_init_on_knn(name, epochs, margin, demo_root, tmp_path):
    exp = os.path.join(CONFIG_DIR, "exp", f"{name}_demo.yaml")
    cfg = load_config(name, [exp], [
        "data.loader=torchvision", f"data.train_path={demo_root}/train", f"eval.train_dir={demo_root}/train",
        f"eval.val_dir={demo_root}/val", f"train.out_dir={tmp_path}", f"train.epochs={epochs}",
        "train.tensorboard=false", "train.ckpt_every=100000", "train.knn_at_end=false"])
    seed_everything(cfg.train.seed)
    random_init = build_method(cfg).backbone_for_eval("auto")
    rand = knn_of_backbone(random_init, cfg, cfg.eval.train_dir, cfg.eval.val_dir, torch.device("cpu"))
    trainer = Trainer(cfg)
    trainer.fit()
    trained = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir,
                              trainer.device)
    print(f"{name}: kNN top-1 trained {trained['k20']['top1']:.1f} %, random init {rand['k20']['top1']:.1f} %")
    assert trained["k20"]["top1"] >= rand["k20"]["top1"] + margin, (trained, rand)
