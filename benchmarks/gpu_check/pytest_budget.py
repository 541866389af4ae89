"""pytest plugin for the GPU check's correctness stages (``-p benchmarks.gpu_check.pytest_budget``).

* Per-test time limit ``GPU_CHECK_TEST_TIMEOUT`` seconds (SIGALRM in the main thread; pytest-timeout is not part of
  the GPU machine's image): a test over its limit fails with ``TestTimeout`` and the run goes on.
* Each test's outcome is appended as one JSON line to ``GPU_CHECK_RESULT`` the moment it is known, so a stage
  killed at its budget keeps the outcomes of the tests that finished.
"""

from __future__ import annotations

import json
import os
import signal

import pytest


class TestTimeout(Exception):
    """A test ran past GPU_CHECK_TEST_TIMEOUT."""

    __test__ = False  # not a test class


def _append(row: dict) -> None:
    path = os.environ.get("GPU_CHECK_RESULT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.failed:
        text = report.longreprtext.strip().splitlines()
        errors = [line for line in text if line.startswith("E ")]
        return "\n".join((errors or text)[-6:])[:1500]
    out = getattr(report, "capstdout", "").strip()
    return out.splitlines()[-1][:500] if out else ""  # a passed test's last printed line (its measured numbers)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("GPU_CHECK_TEST_TIMEOUT", "0") or 0)

    def _alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past its {limit:.0f} s limit (GPU_CHECK_TEST_TIMEOUT)")
    old = signal.signal(signal.SIGALRM, _alarm) if limit > 0 else None
    if limit > 0:
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        _append({"id": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
                 "message": _message(report)})


def pytest_collectreport(report):
    if not report.passed:  # a module skipped at import (e.g. importorskip) or failing to import
        _append({"id": report.nodeid, "outcome": "skipped" if report.skipped else "error", "seconds": 0.0,
                 "message": _message(report)})
