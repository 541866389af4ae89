"""The GPU check's report: one JSON file (machine-readable) and one Markdown file (for people), rewritten whole after
every stage so that a run killed at any point leaves both readable.

Every number is a measurement dict ``{"name", "value", "unit"}`` with optional ``"goal"`` (text, e.g. ">= 2x"),
``"met"`` (bool) and ``"note"``; a correctness stage lists its pytest tests ``{"id", "outcome", "seconds",
"message"}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata, util

from runtime.atomic import write_text_atomic


@dataclass
class StageResult:
    """What one stage did. ``status``: pending | running | passed | failed | skipped | timeout | error."""

    name: str
    kind: str  # correctness | performance
    what: str
    budget_s: float
    status: str = "pending"
    seconds: float = 0.0
    note: str = ""
    tests: list[dict] = field(default_factory=list)
    measurements: list[dict] = field(default_factory=list)
    log: str = ""  # path of the stage's full output
    log_tail: str = ""  # last lines of it when the stage failed


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    """Driver version and GPU names from nvidia-smi (empty when it is absent or fails)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return {"nvidia_smi_gpus": [r[0] for r in rows], "driver": rows[0][1] if rows else None,
            "gpu_memory_total": rows[0][2] if rows else None}


def _importable(name: str) -> bool:
    try:
        return util.find_spec(name) is not None
    except (ImportError, ValueError):  # a dotted name whose parent package is absent
        return False


def environment(device: str) -> dict:
    """Machine, accelerator and library versions (the report header)."""
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": device,
           **{name: _version(name) for name in ("triton", "timm", "torchvision", "numpy", "numba", "pillow")},
           "ffcv": _version("ffcv"), "nvidia_dali": _version("nvidia-dali-cuda130") or _version("nvidia-dali-cuda120")
           or ("present" if _importable("nvidia.dali") else None)}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), **_nvidia_smi())
    return env


@dataclass
class Report:
    env: dict
    total_budget_s: float
    stages: list[StageResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    finished: str = ""

    def to_dict(self) -> dict:
        return {"started": self.started, "finished": self.finished, "total_budget_s": self.total_budget_s,
                "env": self.env, "stages": [dataclasses.asdict(s) for s in self.stages]}

    def write(self, out_dir: str) -> None:
        """Atomically (re)write ``report.json`` and ``report.md`` in ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        write_text_atomic(os.path.join(out_dir, "report.json"), json.dumps(self.to_dict(), indent=2))
        write_text_atomic(os.path.join(out_dir, "report.md"), render_markdown(self.to_dict()))



def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _stage_markdown(s: dict) -> list[str]:
    lines = [f"## {s['name']} — {s['status']}", "", f"{s['what']} ({s['kind']}; {s['seconds']:.0f} s of a "
             f"{s['budget_s']:.0f} s budget)", ""]
    if s["note"]:
        lines += [f"Note: {_cell(s['note'])}", ""]
    if s["measurements"]:
        lines += ["| measurement | value | unit | goal | note |", "|---|---:|---|---|---|"]
        for m in s["measurements"]:
            goal = m.get("goal", "")
            if goal and "met" in m:
                goal = f"{goal} ({'met' if m['met'] else 'NOT met'})"
            lines.append(f"| {_cell(m['name'])} | {_fmt(m['value'])} | {m['unit']} | {_cell(goal)} | "
                         f"{_cell(m.get('note', ''))} |")
        lines.append("")
    if s["tests"]:
        lines += ["| test | outcome | s | message |", "|---|---|---:|---|"]
        for t in s["tests"]:
            lines.append(f"| `{_cell(t['id'])}` | {t['outcome']} | {t['seconds']:.1f} | {_cell(t['message'][:300])} |")
        lines.append("")
    if s["log_tail"]:
        lines += ["<details><summary>output (last lines)</summary>", "", "```", s["log_tail"].rstrip(), "```",
                  "", "</details>", ""]
    return lines


def render_markdown(r: dict) -> str:
    """The Markdown view of a report dict (``Report.to_dict()``)."""
    env = r["env"]
    lines = ["# flashssl GPU check", "", f"Started {r['started']}, finished {r['finished'] or '(not finished)'}; "
             f"total budget {r['total_budget_s']:.0f} s.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_cell(_fmt(v))} |" for k, v in env.items()]
    lines += ["", "| stage | kind | status | seconds | budget s | note |", "|---|---|---|---:|---:|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['kind']} | {s['status']} | {s['seconds']:.0f} | {s['budget_s']:.0f} | "
                     f"{_cell(s['note'][:160])} |")
    lines.append("")
    for s in r["stages"]:
        lines += _stage_markdown(s)
    return "\n".join(lines) + "\n"
