"""A real learning check for every registered method: a short run of its demo recipe on the built-in dataset must
stay finite and lift kNN top-1 clearly above the random-init backbone of the same architecture."""

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

STEPS = 120  # optimisation steps per method (batch 64): about 3 epochs of the demo set
MARGIN = 5.0  # kNN top-1 points above random init that every method must reach


@pytest.fixture(scope="module")
def demo_root():
    return ensure_demo_dataset(os.path.join(ROOT, "data", "demo"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_learns_on_demo_data(name, demo_root, tmp_path):
    exp = os.path.join(CONFIG_DIR, "exp", f"{name}_demo.yaml")
    assert os.path.exists(exp), f"every method needs a demo config: {exp}"
    torch.set_num_threads(2)
    cfg = load_config(name, [exp], [
        f"data.train_path={demo_root}/train", f"eval.train_dir={demo_root}/train", f"eval.val_dir={demo_root}/val",
        f"train.out_dir={tmp_path}", "train.epochs=3", f"train.steps_per_epoch={STEPS // 3}", "train.log_every=20",
        "train.tensorboard=false", "train.ckpt_every=100000", "data.workers=2"])
    trainer = Trainer(cfg)
    state = trainer.fit()
    losses = [h["loss"] for h in state.history]
    assert state.step == STEPS and all(torch.isfinite(torch.tensor(losses)))
    dev = trainer.device
    trained = knn_of_backbone(trainer.method.backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir, dev)
    seed_everything(cfg.train.seed)
    rand = knn_of_backbone(build_method(cfg).backbone_for_eval("auto"), cfg, cfg.eval.train_dir, cfg.eval.val_dir, dev)
    gain = trained["k20"]["top1"] - rand["k20"]["top1"]
    print(f"[learning] {name}: kNN top-1 random {rand['k20']['top1']:.1f}% -> trained {trained['k20']['top1']:.1f}%")
    assert gain > MARGIN, (name, rand, trained)
