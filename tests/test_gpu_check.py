"""``make gpu-check`` on the CPU: the clear exit without CUDA, the stage runner (budget kill, partial results, failing
and missing-dependency stages), the per-test pytest plugin, the report files, and that the check imports with only
the GPU machine's packages. The whole check at tiny shapes on the CPU is the slow test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.gpu_check.__main__ import main as gpu_check_main
from benchmarks.gpu_check.report import Report, environment, render_markdown
from benchmarks.gpu_check.runner import Stage, run_all
from benchmarks.gpu_check.stages import CORRECTNESS, PERFORMANCE, TOTAL_S, build_stages

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_exits_at_once_with_a_clear_message_without_cuda(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "r")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device is visible" in out.stderr and "docs/gpu_check.md" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_budgets_fit_the_total_and_unknown_stages_are_rejected(capsys):
    assert sum(b for *_, b, _ in CORRECTNESS) + sum(p[2] for p in PERFORMANCE) <= TOTAL_S
    assert TOTAL_S <= 8 * 60
    assert gpu_check_main(["--only", "kernels", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert gpu_check_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(s.name in listed for s in build_stages("cuda", False))


RECORD_THEN_HANG = """
    from benchmarks.gpu_check.child import Recorder
    import time
    rec = Recorder()
    rec.add("first number", 1.5, "ms")
    time.sleep(60)
"""


def test_runner_keeps_going_and_the_report_is_readable_at_every_point(tmp_path):
    stages = [
        Stage("raises", "performance", "a stage that raises", 30, _py("raise RuntimeError('boom in stage')")),
        Stage("hangs", "performance", "a stage past its budget", 12, _py(RECORD_THEN_HANG)),
        Stage("no_dep", "performance", "a stage whose module is missing", 30, _py("pass"),
              requires=("surely_not_a_module_xyz",)),
        Stage("fine", "performance", "a stage that measures", 30,
              _py("from benchmarks.gpu_check.child import Recorder; Recorder().add('x', 2.0, 'images/s')")),
    ]
    out = str(tmp_path / "report")
    seen = []

    def after(stage):  # what a run killed right after this stage would leave
        seen.append(json.loads(Path(out, "report.json").read_text())["stages"])
    report = run_all(stages, Report({"device": "cpu"}, 60.0), out, 60.0, on_stage=after)
    by_name = {s.name: s for s in report.stages}
    assert by_name["raises"].status == "error" and "boom in stage" in by_name["raises"].log_tail
    assert by_name["hangs"].status == "timeout" and by_name["hangs"].seconds < 30
    assert by_name["hangs"].measurements == [{"name": "first number", "value": 1.5, "unit": "ms"}]
    assert by_name["no_dep"].status == "skipped" and "surely_not_a_module_xyz" in by_name["no_dep"].note
    assert by_name["fine"].status == "passed" and by_name["fine"].measurements[0]["unit"] == "images/s"
    assert [s["status"] for s in seen[0]] == ["error", "pending", "pending", "pending"]
    assert seen[1][1]["status"] == "timeout"
    md = Path(out, "report.md").read_text()
    for text in ("## raises — error", "## hangs — timeout", "| first number | 1.5 | ms |", "surely_not_a_module_xyz",
                 "boom in stage"):
        assert text in md
    assert json.loads(Path(out, "report.json").read_text())["finished"]


PLUGIN_TESTS = """
    import time
    import pytest

    def test_ok():
        print("measured 3.25 ms")

    def test_bad():
        assert 1 == 2

    def test_skipped():
        pytest.skip("needs 2 GPUs")

    def test_slow():
        time.sleep(30)
"""


def test_pytest_plugin_records_each_test_and_enforces_the_per_test_limit(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    result = tmp_path / "out.jsonl"
    env = dict(os.environ, GPU_CHECK_RESULT=str(result), GPU_CHECK_TEST_TIMEOUT="2", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout", "-p",
                          "benchmarks.gpu_check.pytest_budget", "-o", "addopts=", str(tmp_path / "test_sample.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout[-2000:]
    rows = {r["id"].split("::")[-1]: r for r in map(json.loads, result.read_text().splitlines())}
    assert rows["test_ok"]["outcome"] == "passed" and rows["test_ok"]["message"] == "measured 3.25 ms"
    assert rows["test_bad"]["outcome"] == "failed" and "assert 1 == 2" in rows["test_bad"]["message"]
    assert rows["test_skipped"]["outcome"] == "skipped" and "needs 2 GPUs" in rows["test_skipped"]["message"]
    assert rows["test_slow"]["outcome"] == "failed" and "2 s limit" in rows["test_slow"]["message"]
    assert rows["test_slow"]["seconds"] < 15


def test_previous_report_is_moved_not_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "r"
    old = Report({"device": "cpu"}, 1.0, started="2026-01-02 03:04:05 UTC")
    old.write(str(out))
    monkeypatch.setattr("benchmarks.gpu_check.__main__.run_all", lambda stages, report, o, t, on_stage: report)
    assert gpu_check_main(["--device", "cpu", "--only", "nccl", "--out", str(out)]) == 0
    kept = out / "previous" / "2026-01-02_030405" / "report.json"
    assert json.loads(kept.read_text())["started"] == "2026-01-02 03:04:05 UTC"


def test_environment_header_has_the_versions():
    env = environment("cpu")
    for key in ("python", "torch", "triton", "timm", "cpu_count"):
        assert key in env
    assert env["torch"] and "| torch |" in render_markdown(Report(env, 1.0).to_dict())


# Packages of requirements*.txt that the GPU machine's image lacks (it has Python 3.12, torch, Triton, timm and its
# dependencies, numpy, numba, Pillow, OpenCV, scikit-learn/scipy, matplotlib, tensorboard, pytest - and no registry).
ABSENT_ON_GPU_MACHINE = ("ffcv", "nvidia", "kymatio", "psutil", "pytest_timeout", "appdirs", "hypothesis")
BLOCKED_IMPORT = """
    import importlib, sys
    ABSENT = {absent!r}

    for name in ABSENT:  # import -> ModuleNotFoundError, importlib.util.find_spec -> None, as when not installed
        sys.modules[name] = None
    for mod in {modules!r}:
        importlib.import_module(mod)
    print("imported", len({modules!r}))
"""


def test_the_check_imports_with_only_the_gpu_machines_packages():
    """Every module the check runs (its stages, the cuda tests and, through them, the trainer, methods, losses and
    pipeline) imports with ffcv, DALI, kymatio, psutil and pytest-timeout absent."""
    modules = [f"benchmarks.gpu_check.{m}" for m in ("__main__", "perf_kernels", "perf_augment", "perf_step",
                                                    "perf_compile", "perf_end_to_end", "pytest_budget")]
    modules += [f"tests.gpu.{p.stem}" for p in (ROOT / "tests" / "gpu").glob("test_*.py")]
    code = BLOCKED_IMPORT.format(absent=ABSENT_ON_GPU_MACHINE, modules=modules)
    out = subprocess.run(_py(code), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(modules)}" in out.stdout


@pytest.mark.slow
def test_every_stage_runs_on_the_cpu_at_tiny_shapes(tmp_path):
    """The whole check with the device forced to the CPU and tiny shapes (compile variants run eagerly): every stage
    passes or is skipped with a note (DALI without CUDA, ...), and every number has a unit."""
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--tiny", "--out",
                           str(out), "--budget-scale", "8", "--total-seconds", "3000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3300)
    report = json.loads((out / "report.json").read_text())
    status = {s["name"]: (s["status"], s["note"]) for s in report["stages"]}
    assert proc.returncode == 0, (status, proc.stdout[-3000:])
    assert set(status) == {s.name for s in build_stages("cpu", True)}
    assert status["dali"][0] == "skipped" and status["nccl"][0] == "passed"  # gloo stands in for NCCL on the CPU
    for s in report["stages"]:
        if s["kind"] == "performance":
            assert s["measurements"] and all(m["unit"] and m["value"] is not None for m in s["measurements"]), s
        else:
            assert any(t["outcome"] == "passed" for t in s["tests"]) or s["status"] == "skipped", s
    assert "# flashssl GPU check" in (out / "report.md").read_text()
