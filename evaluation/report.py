"""Human-readable result tables."""

from __future__ import annotations

import json
import os
import statistics


def run_throughput(run_dir: str) -> float | None:
    """Median training images/s logged in ``run_dir/metrics.jsonl`` (the first window, with warm-up, is dropped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return statistics.median(ips[1:] or ips) if ips else None


def print_knn_table(res: dict, run_dir: str | None = None) -> None:
    """Rows: backbones (pretrained, random init); columns: kNN top-1 per k, seconds."""
    rows = [name for name in ("pretrained", "random_init") if name in res]
    ks = [k for k in res[rows[0]] if k.startswith("k")]
    header = f"{'backbone':<14}" + "".join(f"{'kNN@' + k[1:] + ' top-1':>15}" for k in ks) + f"{'eval s':>9}"
    print("\n" + header)
    print("-" * len(header))
    for name in rows:
        r = res[name]
        print(f"{name:<14}" + "".join(f"{r[k]['top1']:>14.2f}%" for k in ks) + f"{r['seconds']:>9.1f}")
    if run_dir:
        ips = run_throughput(run_dir)
        if ips is not None:
            print(f"training throughput: {ips:.1f} images/s (median over logging windows, all crops of an image = 1)")
    print()
