"""Run a function on a real multi-process gloo group on the CPU (for distributed-equivalence tests).

Usage::

    def _worker(rank, world_size, tmpdir, *args):  # module-level, picklable
        ...  # runtime.dist helpers now see an initialised group
        return something_picklable

    results = run_distributed(_worker, 2, *args)   # list indexed by rank
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, tmpdir: str, fn, args, backend: str = "gloo") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    tdist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, tmpdir, *args)
        torch.save({"ok": True, "result": result}, os.path.join(tmpdir, f"result_{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(tmpdir, f"result_{rank}.pt"))
        raise
    finally:
        tdist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, backend: str = "gloo"):
    """Spawn ``world_size`` processes (gloo; ``backend="nccl"``: one GPU each) running ``fn(rank, world_size, tmpdir,
    *args)``; return their results."""
    with tempfile.TemporaryDirectory() as tmpdir:
        port = _free_port()
        try:
            mp.spawn(_entry, args=(world_size, port, tmpdir, fn, args, backend), nprocs=world_size, join=True)
        except Exception:
            pass  # the per-rank error file below carries the real traceback
        results = []
        for r in range(world_size):
            path = os.path.join(tmpdir, f"result_{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} produced no result (crashed before reporting)")
            data = torch.load(path, weights_only=False)
            if not data["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{data['error']}")
            results.append(data["result"])
        return results
