"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and they would catch an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["runtime", "pipeline", "models", "losses", "optim", "methods", "engine", "evaluation", "benchmarks"]
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(cwd: str) -> subprocess.CompletedProcess:
    if not os.path.exists(LINT):
        pytest.skip("import-linter is not installed (make setup installs it)")
    env = dict(os.environ, PYTHONPATH=cwd)
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, planted, edge", [
    ("models/backbone.py", "from engine.config import Config", "models.backbone -> engine.config"),
    ("pipeline/load/crops.py", "from pipeline.convert.scan import Skip", "load.crops -> pipeline.convert.scan"),
    ("evaluation/features.py", "from engine.config import Config", "evaluation.features -> engine.config"),
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, planted, edge):
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{planted}  # noqa: E402,F401  (planted upward import)\n")
    res = _lint(str(tmp_path))
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and edge in res.stdout, res.stdout
