"""``python3 -m benchmarks.gpu_check [--out gpu_report] [--only STAGE ...] [--total-seconds 480]``

Runs the GPU check's stages (``benchmarks.gpu_check.stages``) and writes ``<out>/report.json`` and
``<out>/report.md``. Exits 2 at once when no CUDA device is visible. A previous report in ``<out>`` is moved to
``<out>/previous/<its start time>/`` first, never overwritten. Exit code: 0 when every stage passed or was skipped,
1 otherwise (the report says which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from benchmarks.gpu_check.report import Report, environment
from benchmarks.gpu_check.runner import run_all
from benchmarks.gpu_check.stages import TOTAL_S, build_stages


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_report", help="report folder (default: gpu_report)")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run only these stages")
    p.add_argument("--total-seconds", type=float, default=TOTAL_S,
                   help=f"wall-clock budget of the whole check (default {TOTAL_S:.0f}); stages past it are skipped")
    p.add_argument("--list", action="store_true", help="print the stages and their budgets, run nothing")
    # test-only switches: the CPU test suite runs every stage's code path on the CPU at tiny shapes
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget-scale", type=float, default=1.0, help=argparse.SUPPRESS)  # slow CPUs: longer budgets
    return p.parse_args(argv)


def _archive_previous(out: str) -> str | None:
    """Move an existing report (and its stage logs) to ``out/previous/<started>/``; return that folder."""
    path = os.path.join(out, "report.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            stamp = json.load(f).get("started", "")
    except (OSError, ValueError):
        stamp = ""
    stamp = (stamp or time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(path))))
    dest = os.path.join(out, "previous", stamp.replace(" UTC", "").replace(" ", "_").replace(":", ""))
    os.makedirs(dest, exist_ok=True)
    for name in ("report.json", "report.md", "stages"):
        if os.path.exists(os.path.join(out, name)):
            shutil.move(os.path.join(out, name), os.path.join(dest, name))
    return dest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stages = build_stages(args.device, args.tiny, args.only,
                              inductor_cache=os.path.abspath(os.path.join(args.out, "inductor_cache")),
                              budget_scale=args.budget_scale)
    except ValueError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for s in stages:
            print(f"{s.name:<14} {s.kind:<12} {s.budget_s:5.0f} s  {s.what}")
        print(f"total budget {args.total_seconds:.0f} s")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False), so there is nothing to "
              "check here. Run `make gpu-check` on a machine with an NVIDIA GPU; docs/gpu_check.md says how.",
              file=sys.stderr)
        return 2
    moved = _archive_previous(args.out)
    if moved:
        print(f"gpu-check: previous report moved to {moved}")
    report = Report(environment(args.device), args.total_seconds)
    print(f"gpu-check: {len(stages)} stages, {args.total_seconds:.0f} s at most; report in {args.out}/report.md",
          flush=True)

    def progress(s) -> None:
        print(f"  {s.name:<14} {s.status:<8} {s.seconds:5.0f} s / {s.budget_s:.0f} s  {s.note[:100]}", flush=True)
    run_all(stages, report, args.out, args.total_seconds, on_stage=progress)
    bad = [s.name for s in report.stages if s.status not in ("passed", "skipped")]
    print(f"gpu-check: done; {'all stages passed or were skipped' if not bad else 'not passed: ' + ', '.join(bad)}"
          f"; report {args.out}/report.md")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
