"""Run the GPU check's stages one after another, each in its own process group under its own time budget.

A stage is a command (a pytest run of ``cuda``-marked tests, or a ``python -m benchmarks.gpu_check.perf_*`` child)
that writes its results to the file named by ``GPU_CHECK_RESULT`` as it goes: pytest stages one JSON line per test
(``pytest_budget``), performance stages the whole measurement list after each number (``child.Recorder``). So a
stage killed at its budget still contributes what it finished. The report is rewritten after every stage.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.gpu_check.report import Report, StageResult

MIN_STAGE_S = 5.0  # a stage is not started with less than this left of the total budget


@dataclass
class Stage:
    """One step of the check.

    Args:
        name: short id (report section, log and result file names).
        kind: ``correctness`` (``argv`` runs pytest with the ``pytest_budget`` plugin) or ``performance``.
        what: one line for the report.
        budget_s: wall-clock budget; the process group is killed when it is spent.
        argv: the command (``sys.executable`` first).
        requires: importable modules the stage needs; when one is missing the stage is skipped with a note.
        env: extra environment variables.
    """

    name: str
    kind: str
    what: str
    budget_s: float
    argv: list[str]
    requires: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL it 5 s later if anything is left (workers, compile threads)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def _read_tests(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_measurements(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _pytest_status(rc: int, tests: list[dict]) -> tuple[str, str]:
    outcomes = [t["outcome"] for t in tests]
    if rc == 0 and outcomes and all(o == "skipped" for o in outcomes):
        reasons = sorted({t["message"] for t in tests})
        return "skipped", "; ".join(reasons)[:500]
    if rc == 0:
        return "passed", f"{outcomes.count('passed')} passed, {outcomes.count('skipped')} skipped"
    if rc == 5:
        return "skipped", "no test collected"
    failed = [t["id"] for t in tests if t["outcome"] in ("failed", "error")]
    return ("failed" if rc == 1 else "error"), f"pytest exit {rc}; failed: {', '.join(failed)[:400]}"


def run_stage(stage: Stage, work_dir: str, seconds_left: float) -> StageResult:
    """Run one stage (or skip it: missing module, total budget spent) and return its result."""
    res = StageResult(stage.name, stage.kind, stage.what, stage.budget_s)
    missing = [m for m in stage.requires if importlib.util.find_spec(m) is None]
    if missing:
        res.status, res.note = "skipped", f"needs {', '.join(missing)} (not installed here)"
        return res
    budget = min(stage.budget_s, seconds_left)
    if budget < MIN_STAGE_S:
        res.status, res.note = "skipped", f"total budget spent ({seconds_left:.0f} s left)"
        return res
    os.makedirs(work_dir, exist_ok=True)
    result_path = os.path.join(work_dir, f"{stage.name}.result")
    res.log = os.path.join(work_dir, f"{stage.name}.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(result_path)
    env = dict(os.environ, GPU_CHECK_RESULT=result_path, GPU_CHECK_WORK=work_dir, PYTHONUNBUFFERED="1", **stage.env)
    t0 = time.monotonic()
    with open(res.log, "w") as log:
        proc = subprocess.Popen(stage.argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    res.seconds = time.monotonic() - t0
    _collect(res, stage, result_path, rc, budget)
    if res.status not in ("passed", "skipped"):
        res.log_tail = _tail(res.log)
    return res


def _collect(res: StageResult, stage: Stage, result_path: str, rc: int | None, budget: float) -> None:
    """Fill status, note, tests / measurements from the stage's result file and exit code."""
    if stage.kind == "correctness":
        res.tests = _read_tests(result_path)
        if rc is None:
            res.status, res.note = "timeout", f"killed at its {budget:.0f} s budget after {len(res.tests)} test(s)"
        else:
            res.status, res.note = _pytest_status(rc, res.tests)
        return
    data = _read_measurements(result_path)
    res.measurements = data.get("measurements", [])
    res.note = data.get("note", "")
    if rc is None:
        res.status = "timeout"
        res.note = f"killed at its {budget:.0f} s budget; {len(res.measurements)} measurement(s) kept. {res.note}"
    elif rc != 0:
        res.status, res.note = "error", f"exit {rc}. {res.note}"
    else:
        res.status = data.get("status", "passed")


def run_all(stages: list[Stage], report: Report, out_dir: str, total_s: float,
            on_stage: Callable[[StageResult], None] | None = None) -> Report:
    """Run ``stages`` in order within ``total_s`` seconds, rewriting the report before and after each one."""
    t_end = time.monotonic() + total_s
    work_dir = os.path.join(out_dir, "stages")
    report.stages = [StageResult(s.name, s.kind, s.what, s.budget_s) for s in stages]
    report.write(out_dir)
    for i, stage in enumerate(stages):
        report.stages[i].status = "running"
        report.write(out_dir)
        report.stages[i] = run_stage(stage, work_dir, t_end - time.monotonic())
        report.write(out_dir)
        if on_stage is not None:
            on_stage(report.stages[i])
    report.finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    report.write(out_dir)
    return report


def python() -> list[str]:
    """The interpreter running the check (the GPU machine's ``python3``, not the project's .venv)."""
    return [sys.executable]
