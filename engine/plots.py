"""Training curves of a run as one PNG: ``python -m engine.plots RUN_DIR [--out FILE]``.

Reads ``<run>/metrics.jsonl`` (one row per logged step, :class:`runtime.logging.MetricLogger`) and, when present, the
kNN results of the run (``knn.json`` written by train.py, ``knn_eval.json`` by ``eval.py knn --report``), and draws
one panel per quantity that exists: loss, learning rate, images/s, the collapse statistics ``feat_rank`` /
``feat_std`` (:mod:`engine.collapse`) and accuracies (any logged key containing ``top1``/``acc``, e.g. an online
probe, plus the final kNN top-1 (%) as a marker at the last step). Uses matplotlib's object API on the Agg canvas: no
display, no global pyplot state. :func:`save_figure` is shared by the other pictures (t-SNE, lr range test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from runtime.atomic import atomic_path
from runtime.logging import jsonl_rows

#: (panel title, metric keys drawn in it, log-scale y) in drawing order; a panel without data is skipped
PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("loss", ("loss",), False),
    ("learning rate", ("lr",), True),
    ("images/s", ("images_per_s",), False),
    ("feature effective rank", ("feat_rank",), False),
    ("std of L2-normalised features", ("feat_std",), False),
)
ACCURACY_HINTS = ("top1", "acc")


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics JSONL file; unreadable lines (a killed writer's tail) are skipped."""
    return [row for _, row in jsonl_rows(path)]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the rows that have it as a number."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def accuracy_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k in r if any(h in k.lower() for h in ACCURACY_HINTS)}
    return sorted(keys)


def knn_points(run_dir: str) -> dict[str, float]:
    """Final kNN top-1 (%) per result file found in the run: {'knn k=20': 41.2, ...}."""
    out = {}
    for name in ("knn.json", "knn_eval.json"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                res = json.load(f)
        except ValueError:
            continue
        res = res.get("pretrained", res)  # eval.py knn nests the checkpoint's result under 'pretrained'
        for k, v in res.items():
            if k.startswith("k") and isinstance(v, dict) and "top1" in v:
                out[f"{name.split('.')[0]} {k[0]}={k[1:]}"] = float(v["top1"])
    return out


def new_figure(n_panels: int, width: float = 11.0, row_height: float = 2.6):
    """A Figure on the Agg canvas with ``n_panels`` axes in a 2-column grid; returns (fig, axes list)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 1 if n_panels == 1 else 2
    rows = (n_panels + cols - 1) // cols
    fig = Figure(figsize=(width if cols == 2 else width / 1.6, row_height * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Write ``fig`` as PNG to ``path`` (temp file + rename: a killed job leaves no truncated image)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def plot_training_curves(run_dir: str, out: str | None = None):
    """Draw the run's curves; writes ``out`` (default ``<run_dir>/curves.png``). Returns the Figure.

    Each line's data is exactly the JSONL series (``Line2D.get_data()`` gives back the steps and values).
    Raises FileNotFoundError when the run has no metrics.jsonl, ValueError when it has no plottable row.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {run_dir!r} a train.py run directory?)")
    rows = read_metrics(path)
    panels = [(t, keys, log) for t, keys, log in PANELS if any(series(rows, k)[0] for k in keys)]
    acc = accuracy_keys(rows)
    knn = knn_points(run_dir)
    if acc or knn:
        panels.append(("accuracy (top-1)", tuple(acc), False))
    if not panels:
        raise ValueError(f"{path}: no plottable rows (expected 'step' with 'loss', 'lr', ...)")
    fig, axes = new_figure(len(panels))
    last = max((r["step"] for r in rows), default=0)
    for ax, (title, keys, log) in zip(axes, panels):
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, label=key, linewidth=1.2)
        if title.startswith("accuracy"):
            for i, (label, top1) in enumerate(knn.items()):
                ax.plot([last], [top1], marker=("*", "o", "s")[i % 3], markersize=10, linestyle="none", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1 or title.startswith("accuracy"):
            ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.abspath(run_dir))}: {len(rows)} logged steps, last step {last}")
    save_figure(fig, out or os.path.join(run_dir, "curves.png"))
    return fig


def plot_run_safely(run_dir: str) -> str | None:
    """End-of-run hook (rank 0 draws, other ranks return None): the curves PNG path, or None and a warning on any
    failure (a plot never fails a run)."""
    from runtime import dist

    if not dist.is_main():
        return None
    try:
        plot_training_curves(run_dir)
    except Exception as e:  # noqa: BLE001 - a missing font or a full disk must not turn a finished run into an error
        print(f"[plots] WARNING: could not draw the training curves of {run_dir}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return None
    return os.path.join(run_dir, "curves.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="train.py output directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default <run_dir>/curves.png)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dir, "curves.png")
    try:
        plot_training_curves(args.run_dir, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
