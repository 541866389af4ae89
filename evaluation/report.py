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
    if "method" in res:
        print(f"\nkNN: {res['method']} ({res.get('backbone', '?')}), {res.get('checkpoint', '')}")
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


def print_linear_summary(res: dict, out: str | None = None) -> None:
    """Best / last top-1 and top-5 of a linear probe, with its run time (rank 0 only)."""
    from runtime import dist

    if not dist.is_main():
        return
    kind = {"linear_fast_eval": "fast linear probe (cached features)",
            "semi_eval": "semi-supervised fine-tuning"}.get(res.get("kind"), "linear probe")
    best, last = res["best"], res["last"]
    print(f"\n{kind}: {res.get('method', '?')} {res.get('backbone', '?')} ({res.get('weights', 'auto')} weights), "
          f"protocol {res['protocol']}, peak lr {res['peak_lr']:.4g}, {res.get('num_classes', '?')} classes")
    print(f"{'':<6}{'epoch':>7}{'top-1':>9}{'top-5':>9}")
    for name, row in (("best", best), ("last", last)):
        print(f"{name:<6}{row['epoch'] + 1:>7}{row['top1']:>8.2f}%{row['top5']:>8.2f}%")
    if "best_of_grid" in res and len(res.get("heads", {})) > 1:
        g = res["best_of_grid"]
        print(f"best of lr grid: {g['head']} top-1 {g['top1']:.2f}% (epoch {g['epoch'] + 1}, selected on val)")
    timing = f"total {res['seconds']:.1f} s"
    if "feature_seconds" in res:
        timing += f" (features {res['feature_seconds']:.1f} s, classifier {res['train_seconds']:.1f} s)"
    print(timing + (f"; results: {out}" if out else "") + "\n")
