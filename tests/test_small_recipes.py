"""The small-data recipes ``configs/exp/<method>_small.yaml``: one per method, ResNet-18 at 32-96 px, each key a
change against the method's defaults (a diff, not a copy), and a named source in the file."""

from __future__ import annotations

import os

import pytest
import yaml

from engine.config import CONFIG_DIR, config_to_dict, load_config
from methods import METHODS


def _recipe(name: str) -> str:
    return os.path.join(CONFIG_DIR, "exp", f"{name}_small.yaml")


def _leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("name", sorted(METHODS))
def test_small_recipe_loads_and_is_a_diff_against_the_defaults(name):
    path = _recipe(name)
    cfg = load_config(name, [path])
    assert cfg.model.backbone == "resnet18"
    sizes = [v.size for v in cfg.data.expanded_views()]
    assert all(32 <= s <= 96 for s, v in zip(sizes, cfg.data.expanded_views(), strict=True) if v.role == "global")
    assert all(16 <= s <= 96 for s in sizes), sizes
    defaults = config_to_dict(load_config(name, []))
    resolved = config_to_dict(cfg)
    with open(path) as f:
        raw = yaml.safe_load(f)
    for key, _ in _leaves(raw):
        if key.startswith("data.views"):
            continue
        assert _get(resolved, key) != _get(defaults, key), f"{path}: {key} repeats the default; drop it"
    assert resolved["data"]["views"] != defaults["data"]["views"]
    with open(path) as f:
        text = f.read()
    assert "Source:" in text and ("@" in text or "derived" in text.lower()), f"{path} must name its source"
