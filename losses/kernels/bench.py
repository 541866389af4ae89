"""Benchmark the fused loss paths against their references: ``python -m losses.kernels.bench [--real]``.

Not a timed test. For each loss and shape it runs the reference and the fused path (Triton on CUDA, the
``torch.compile``'d chunked path on CPU) side by side in one invocation and prints the time per call
(forward + backward, median of ``--reps``) and the peak memory of one call, with fused/reference ratios.

Peak memory on CPU is the largest growth of the resident set (RSS, sampled every 0.2 ms from ``/proc/self/statm``
by a background thread) over the RSS just before a forward + backward, the maximum over three calls; each
(loss, shape, path) runs in a fresh subprocess after the inputs exist and after a warm-up call (so compilation is
not counted), and glibc's mmap threshold is pinned so freed large blocks leave the RSS. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the inputs.

Shapes (per rank): DINO/SCFS real = S 10 student crops (2 global + 8 local), T 2, B 64, K 65,536; ReSSL real =
S 1, B 64, D 512, K 131,072. The CPU-sized variants shrink the batch (and the ReSSL queue) to run in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

SHAPES = {
    ("dino", "cpu"): dict(S=10, T=2, B=4, K=65536),
    ("dino", "real"): dict(S=10, T=2, B=64, K=65536),
    ("ressl", "cpu"): dict(S=1, B=16, D=128, K=32768),
    ("ressl", "real"): dict(S=1, B=64, D=512, K=131072),
}
TAU_S, TAU_T = 0.1, 0.04


def _make(loss: str, shape: dict, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    if loss == "dino":
        student = torch.randn(shape["S"], shape["B"], shape["K"], generator=gen).to(device, dtype)
        teacher = torch.randn(shape["T"], shape["B"], shape["K"], generator=gen).to(device, dtype)
        return student, (teacher, torch.zeros(shape["K"], device=device))
    student = F.normalize(torch.randn(shape["S"], shape["B"], shape["D"], generator=gen), dim=-1).to(device, dtype)
    teacher = F.normalize(torch.randn(shape["B"], shape["D"], generator=gen), dim=-1).to(device, dtype)
    return student, (teacher, F.normalize(torch.randn(shape["K"], shape["D"], generator=gen), dim=-1).to(device))


def _step_fn(loss: str, path: str):
    """Return f(student_leaf, extra) -> scalar loss for the chosen path."""
    from losses.dino import multicrop_cross_entropy, teacher_probs
    from losses.kernels import relation_ce_fused, soft_ce_fused
    from losses.ressl import relation_targets, ressl_cross_entropy
    if loss == "dino" and path == "reference":
        return lambda x, e: multicrop_cross_entropy(x, teacher_probs(e[0], e[1], TAU_T), TAU_S)
    if loss == "dino":
        return lambda x, e: soft_ce_fused(x, e[0], e[1], TAU_S, TAU_T)[0]
    if path == "reference":
        return lambda x, e: ressl_cross_entropy(x, relation_targets(e[0], e[1], TAU_T), e[1], TAU_S)
    return lambda x, e: relation_ce_fused(x, e[0], e[1], TAU_S, TAU_T)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sample(peak: list[int], done: threading.Event) -> None:
    while not done.is_set():
        peak[0] = max(peak[0], _rss())
        time.sleep(2e-4)


def _cpu_peak(call, n: int = 3) -> int:
    """Largest RSS growth over the RSS before ``call()``, sampled by a thread, max over ``n`` calls."""
    best = 0
    for _ in range(n):
        base, peak, done = _rss(), [0], threading.Event()

        th = threading.Thread(target=_sample, args=(peak, done), daemon=True)
        th.start()
        call()
        done.set()
        th.join()
        best = max(best, max(peak[0], _rss()) - base)
    return best


def _worker(loss: str, size: str, path: str, reps: int, device: str, dtype: torch.dtype) -> dict:
    fn = _step_fn(loss, path)
    tiny = {k: (min(v, 3) if k in ("S", "T") else min(v, 2) if k == "B" else v) for k, v in SHAPES[loss, size].items()}
    x, extra = _make(loss, tiny, device, dtype)
    fn(x.requires_grad_(), extra).backward()  # warm-up (compilation) outside the measurement
    x, extra = _make(loss, SHAPES[loss, size], device, dtype)
    x.requires_grad_()
    fn(x, extra).backward()  # warm-up at the measured shape (dynamic-shape guards, allocator caches)
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, extra).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        def call():
            x.grad = None
            fn(x, extra).backward()
        peak = _cpu_peak(call)
    times = []
    for _ in range(reps):
        x.grad = None
        t0 = time.perf_counter()
        fn(x, extra).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_bytes": max(peak, 0)}


def _run(loss: str, size: str, path: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", FLASHSSL_FUSED="1" if path == "fused" else "0")
    cmd = [sys.executable, "-m", "losses.kernels.bench", "--worker", loss, size, path, "--reps", str(args.reps),
           "--threads", str(args.threads), "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {loss}/{size}/{path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", action="store_true", help="also run the real ImageNet shapes (needs a few GiB)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine usable)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--worker", nargs=3, metavar=("LOSS", "SIZE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.reps, device, getattr(torch, args.dtype))))
        return
    sizes = ["cpu", "real"] if args.real else ["cpu"]
    print(f"device {device}, dtype {args.dtype}, threads {args.threads}, reps {args.reps} (fwd+bwd per call)")
    print(f"{'loss':6} {'shape':5} {'ref ms':>9} {'fused ms':>9} {'speedup':>8} {'ref MiB':>9} {'fused MiB':>9} "
          f"{'mem ratio':>9}  shape")
    for loss in ("dino", "ressl"):
        for size in sizes:
            ref, fus = _run(loss, size, "reference", args), _run(loss, size, "fused", args)
            mib = 1 << 20
            print(f"{loss:6} {size:5} {ref['time_s'] * 1e3:9.1f} {fus['time_s'] * 1e3:9.1f} "
                  f"{ref['time_s'] / fus['time_s']:7.2f}x {ref['peak_bytes'] / mib:9.1f} "
                  f"{fus['peak_bytes'] / mib:9.1f} "
                  f"{fus['peak_bytes'] / max(ref['peak_bytes'], 1):9.3f}  {SHAPES[loss, size]}", flush=True)


if __name__ == "__main__":
    main()
