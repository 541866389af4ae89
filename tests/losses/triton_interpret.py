"""Triton kernel tests on the CPU: the Triton interpreter, and a fresh process where triton was imported too early.

``TRITON_INTERPRET=1`` takes effect only if it is set before triton is first imported. Importing this module first
in a kernel test file sets it unless another test of the session already imported triton (e.g. via
``torch._inductor``); then :data:`PREIMPORTED` is True, the file's Triton cases skip, and its
``test_triton_cases_in_fresh_process`` reruns them with :func:`rerun_triton_cases` in a process of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not PREIMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rerun_triton_cases(test_file: str, select: str = "triton or dispatch") -> None:
    """Run the tests of ``test_file`` matching ``-k select`` in a fresh pytest process under the interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
                         env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout, out.stdout[-2000:]
