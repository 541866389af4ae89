"""Every registered method's small-data recipe learns real images through the real trainer, without collapsing.

For each method, ``configs/exp/<m>_small.yaml`` carries a ``check:`` section (epochs, batch size, asserted kNN gain,
about half the gain measured with exactly these settings; docs/small_data.md has the measurements). A run of that
length on the digits scans (:mod:`pipeline.convert.digits_dataset`, torchvision loader) must stay finite, keep the
collapse guard silent and lift weighted kNN (k 20, top-1, the method's evaluated weights) above the same backbone at
initialisation by at least ``check.min_knn_gain`` points. ``python -m benchmarks.learning`` prints the same rows.
"""

import os

import pytest

from benchmarks.learning import learning_config, recipe_path, run_learning
from engine.config import load_config
from methods import METHODS
from pipeline.convert.digits_dataset import ensure_digits_dataset
from tests.conftest import ROOT


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_a_learning_check(name):
    path = recipe_path(name, "small")
    assert os.path.exists(path), f"every method needs a small-data recipe with a check: section: {path}"
    check = load_config(name, [path]).check
    assert check.epochs >= 1 and check.min_knn_gain > 0, (name, check)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_small_recipe_learns_real_images(name, tmp_path):
    root = ensure_digits_dataset(os.path.join(ROOT, "data", "digits"))
    cfg = learning_config(name, "small", root, str(tmp_path / "run"))
    res = run_learning(cfg, f"{name}_small")
    print(res.row())
    assert res.finite, f"{name}: a loss or a parameter became non-finite"
    assert res.steps == res.total_steps >= cfg.check.epochs * 20, (res.steps, res.total_steps)
    assert res.collapse == (), f"{name}: the collapse guard fired: {res.collapse}"
    assert res.gain >= cfg.check.min_knn_gain, (name, res.trained, res.random_init, cfg.check.min_knn_gain)
