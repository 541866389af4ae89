"""Benchmark the fused loss paths against their references: ``python -m benchmarks.kernels [--real]``.

Not a timed test. For each loss and shape it runs the reference and the fused path (Triton on CUDA, the
``torch.compile``'d chunked path on CPU) side by side in one invocation and prints the time per call
(forward + backward, median of ``--reps``) and the peak memory of one call, with fused/reference ratios. With
``--interleave`` the times come from one extra process that alternates reference and fused calls (order flipped
every rep) and the speed-up is the median of the per-rep ratios: on a loaded machine this is the number to trust.

Peak memory on CPU is the largest growth of the resident set (RSS, sampled every 0.2 ms from ``/proc/self/statm``
by a background thread) over the RSS just before a forward + backward, the maximum over three calls; each
(loss, shape, path) runs in a fresh subprocess after the inputs exist and after a warm-up call (so compilation is
not counted), and glibc's mmap threshold is pinned so freed large blocks leave the RSS. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the inputs.

Shapes (per rank): DINO/SCFS real = S 10 student crops (2 global + 8 local), T 2, B 64, K 65,536; ReSSL real =
S 1, B 64, D 512, K 131,072. ReSA, INTL, CW-RGP and MV-MR are timed through their loss modules (``ReSALoss``,
``INTLLoss``, ``CWRGPLoss``, ``MVMRLoss``; the switch picks the path), shapes in ``SHAPES``. The CPU-sized variants
shrink the batch (and the ReSSL queue, the widths) to run in seconds. ``--losses`` selects a subset.
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
    # ReSA: 1 GPU x 256 (the README's bs-256 run), V 2 views, M 2 momentum views, D 512, encoder E 2048
    ("resa", "cpu"): dict(V=2, M=2, B=64, D=128, E=256),
    ("resa", "real"): dict(V=2, M=2, B=256, D=512, E=2048),
    # INTL (symmetric, channel whitening, T 4): global batch N 256, D 8192
    ("intl", "cpu"): dict(V=2, B=64, D=1024),
    ("intl", "real"): dict(V=2, B=256, D=8192),
    # CW-RGP ImageNet: per-GPU batch 128 = w_size, D 1024, G 2
    ("cw_rgp", "cpu"): dict(V=2, B=64, D=256, G=2, W=64),
    ("cw_rgp", "real"): dict(V=2, B=128, D=1024, G=2, W=128),
    # MV-MR: per-GPU batch 256, D 8192, the 5 hand-crafted representations of a 224 px view (F per target)
    ("mvmr", "cpu"): dict(B=64, D=1024, F=(3072, 15552, 3072, 1152, 3072)),
    ("mvmr", "real"): dict(B=256, D=8192, F=(150528, 762048, 150528, 56448, 150528)),
}
LOSSES = ("dino", "ressl", "resa", "intl", "cw_rgp", "mvmr")
TAU_S, TAU_T = 0.1, 0.04


def _make_module_loss(loss: str, shape: dict, device: str, dtype: torch.dtype, gen: torch.Generator):
    """(leaf that gets the gradient, extra inputs) for the module-level benchmarks (ReSA, INTL, CW-RGP, MV-MR)."""
    def rand(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)
    if loss == "resa":
        s = shape
        return rand(s["V"], s["B"], s["D"]), (rand(s["B"], s["E"]), rand(s["M"], s["B"], s["D"]),
                                               rand(s["B"], s["E"]))
    if loss == "intl":
        return rand(shape["V"], shape["B"], shape["D"]), ()
    if loss == "cw_rgp":
        from losses.cw_rgp import draw_partitions
        z = rand(shape["V"], shape["B"], shape["D"])
        return z, draw_partitions(gen, 1, shape["B"], shape["W"], shape["V"], shape["D"])
    from losses.mvmr import DCorTarget
    targets = {f"rep{i}": DCorTarget(torch.randn(shape["B"], f, generator=gen).to(device), 1e-4 * 32**2, False)
               for i, f in enumerate(shape["F"])}
    return rand(2, shape["B"], shape["D"]), targets


def _module_step_fn(loss: str, shape: dict):
    """f(leaf, extra) -> scalar through the loss module; ``use_fused()`` (FLASHSSL_FUSED) picks the path."""
    from losses.cw_rgp import CWRGPLoss
    from losses.intl import INTLLoss
    from losses.mvmr import MVMRLoss
    from losses.resa import ReSALoss
    if loss == "resa":
        resa = ReSALoss(0.4, 0.05, 3)
        return lambda x, e: resa(x, e[0], e[1], e[2])[0]
    if loss == "intl":
        intl = INTLLoss(iters=4, axis=0)
        return lambda x, e: intl(x)[0]
    if loss == "cw_rgp":
        cw = CWRGPLoss(groups=shape["G"], w_size=shape["W"])
        return lambda x, e: cw(x, e[0], e[1])[0]
    mvmr = MVMRLoss(z_clamp=1e-4 * 32**2)
    return lambda x, e: mvmr(x[0], x[1], e)[0]


def _make(loss: str, shape: dict, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    if loss in ("resa", "intl", "cw_rgp", "mvmr"):
        return _make_module_loss(loss, shape, device, dtype, gen)
    if loss == "dino":
        student = torch.randn(shape["S"], shape["B"], shape["K"], generator=gen).to(device, dtype)
        teacher = torch.randn(shape["T"], shape["B"], shape["K"], generator=gen).to(device, dtype)
        return student, (teacher, torch.zeros(shape["K"], device=device))
    student = F.normalize(torch.randn(shape["S"], shape["B"], shape["D"], generator=gen), dim=-1).to(device, dtype)
    teacher = F.normalize(torch.randn(shape["B"], shape["D"], generator=gen), dim=-1).to(device, dtype)
    return student, (teacher, F.normalize(torch.randn(shape["K"], shape["D"], generator=gen), dim=-1).to(device))


def _step_fn(loss: str, path: str, shape: dict):
    """Return f(student_leaf, extra) -> scalar loss for the chosen path."""
    if loss in ("resa", "intl", "cw_rgp", "mvmr"):
        return _module_step_fn(loss, shape)
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
    from losses import kernels
    kernels.set_fused(path == "fused")  # forced, so losses the CPU gate keeps on the reference are measured too
    fn = _step_fn(loss, path, SHAPES[loss, size])
    if loss in ("dino", "ressl"):
        tiny = {k: (min(v, 3) if k in ("S", "T") else min(v, 2) if k == "B" else v)
                for k, v in SHAPES[loss, size].items()}
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


def _time_worker(loss: str, size: str, reps: int, device: str, dtype: torch.dtype) -> dict:
    """Reference and fused calls interleaved in one process (order alternating per rep), so machine-load drift hits
    both alike: medians of each and the median of the per-rep time ratios."""
    from losses import kernels
    shape = SHAPES[loss, size]
    fns = {}
    for path in ("reference", "fused"):
        step = _step_fn(loss, path, shape)
        fns[path] = (lambda st, flag: (lambda x, e: (kernels.set_fused(flag), st(x, e))[1]))(step, path == "fused")
    x, extra = _make(loss, shape, device, dtype)
    x.requires_grad_()
    for fn in fns.values():
        for _ in range(2):  # compilation and dynamic-shape guards outside the measurement
            fn(x, extra).backward()
    times = {"reference": [], "fused": []}
    for rep in range(reps):
        for path in (("reference", "fused") if rep % 2 == 0 else ("fused", "reference")):
            x.grad = None
            t0 = time.perf_counter()
            fns[path](x, extra).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times[path].append(time.perf_counter() - t0)
    ratios = [r / f for r, f in zip(times["reference"], times["fused"])]
    return {"ref_s": statistics.median(times["reference"]), "fused_s": statistics.median(times["fused"]),
            "speedup": statistics.median(ratios)}


def _run(loss: str, size: str, path: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", FLASHSSL_FUSED="1" if path == "fused" else "0")
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--worker", loss, size, path, "--reps", str(args.reps),
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
    ap.add_argument("--interleave", action="store_true",
                    help="time both paths alternately in one process (speed-up = median per-rep ratio); "
                         "more robust on a loaded machine")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    ap.add_argument("--worker", nargs=3, metavar=("LOSS", "SIZE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        loss, size, path = args.worker
        if path == "both":
            print(json.dumps(_time_worker(loss, size, args.reps, device, getattr(torch, args.dtype))))
        else:
            print(json.dumps(_worker(loss, size, path, args.reps, device, getattr(torch, args.dtype))))
        return
    sizes = ["cpu", "real"] if args.real else ["cpu"]
    print(f"device {device}, dtype {args.dtype}, threads {args.threads}, reps {args.reps} (fwd+bwd per call)")
    print(f"{'loss':6} {'shape':5} {'ref ms':>9} {'fused ms':>9} {'speedup':>8} {'ref MiB':>9} {'fused MiB':>9} "
          f"{'mem ratio':>9}  shape")
    for loss in args.losses:
        for size in sizes:
            ref, fus = _run(loss, size, "reference", args), _run(loss, size, "fused", args)
            if args.interleave:  # timing from one process alternating the two paths (memory stays per process)
                t = _run(loss, size, "both", args)
                ref["time_s"], fus["time_s"], speedup = t["ref_s"], t["fused_s"], t["speedup"]
            else:
                speedup = ref["time_s"] / fus["time_s"]
            mib = 1 << 20
            print(f"{loss:6} {size:5} {ref['time_s'] * 1e3:9.1f} {fus['time_s'] * 1e3:9.1f} "
                  f"{speedup:7.2f}x {ref['peak_bytes'] / mib:9.1f} "
                  f"{fus['peak_bytes'] / mib:9.1f} "
                  f"{fus['peak_bytes'] / max(ref['peak_bytes'], 1):9.3f}  {SHAPES[loss, size]}", flush=True)


if __name__ == "__main__":
    main()
