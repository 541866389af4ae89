"""One source of truth per default: no config YAML restates a value of the layer below it, and view presets work."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from engine.config import load_config, restated_keys
from methods import METHODS
from runtime.config_loader import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(ROOT, "configs", "method", "*.yaml"))) + \
    sorted(glob.glob(os.path.join(ROOT, "configs", "exp", "*.yaml")))


def _method_of(path: str) -> str:
    declared = (yaml.safe_load(open(path)) or {}).get("method")
    base = os.path.basename(path)
    return declared or max((m for m in METHODS if base.startswith(m + "_") or base == m + ".yaml"), key=len)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_yaml_restates_a_default(path):
    restated = restated_keys(_method_of(path), path)
    assert not restated, (f"{os.path.relpath(path, ROOT)} restates the layer below (dataclass defaults <- "
                          f"configs/method/<m>.yaml) for {restated}: delete these keys, or change the default")


def test_a_planted_restatement_is_found(tmp_path):
    path = tmp_path / "exp.yaml"
    default_temp = load_config("dino").ssl.teacher_temp
    path.write_text(f"ssl:\n  teacher_temp: {default_temp}\n  student_temp: 0.2\noptim:\n  lr: 0.03\n")
    assert restated_keys("dino", str(path)) == ["ssl.teacher_temp"]


def test_view_preset_expands_and_unknown_preset_is_named(tmp_path):
    cfg = load_config("dino", [], ["data.views=dino_multicrop_demo"])
    assert [(v.role, v.count, v.size) for v in cfg.data.views] == [("global", 1, 64), ("global", 1, 64),
                                                                   ("local", 4, 32)]
    assert load_config("dino", [], ["data.views=dino_multicrop"]).data.views == load_config("dino").data.views
    with pytest.raises(ConfigError, match="unknown view preset 'nope'; known presets: dino_multicrop"):
        load_config("dino", [], ["data.views=nope"])
