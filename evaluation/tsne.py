"""``eval.py tsne``: a 2-D t-SNE map of frozen validation features, one colour per class, as PNG.

Features come from :func:`evaluation.features.embed_split` (resize + center-crop, the kNN protocol) through the
:class:`evaluation.feature_cache.FeatureCache` under the same name and key as ``eval.py knn``'s query features, so a
map after a kNN run re-uses its extraction. Features are L2-normalised (the cosine geometry kNN uses) and embedded
with scikit-learn's Barnes-Hut ``TSNE`` (PCA init, ``learning_rate='auto'``, seeded). The
trustworthiness of the map (scikit-learn, k=5 neighbours, fewer for tiny sets; 1.0 = every 2-D neighbourhood is a
true feature neighbourhood) is reported with it, so two maps can be compared by a number and not only by eye.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.plots import new_figure, save_figure
from evaluation.eval_loaders import EvalSplit
from evaluation.feature_cache import FeatureCache
from evaluation.features import FrozenBackbone, embed_split


def subsample(labels: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_images`` samples, drawn per class in proportion (seeded); all if 0/enough."""
    n = len(labels)
    if max_images <= 0 or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = max(1, round(len(idx) * max_images / n))
        picked.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))[:max_images]


def tsne_map(features: torch.Tensor, perplexity: float = 30.0, seed: int = 0) -> tuple[np.ndarray, float]:
    """(N, D) features -> ((N, 2) float64 map, perplexity used). Perplexity is capped below N/3 (TSNE needs < N)."""
    from sklearn.manifold import TSNE

    x = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy().astype(np.float64)
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 images, got {n}")
    used = float(min(perplexity, (n - 1) / 3))
    xy = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)
    return xy, used


def plot_map(xy: np.ndarray, labels: np.ndarray, class_names: list[str], title: str, out: str):
    """Scatter of the (N, 2) map, one PathCollection per class in class-index order; writes ``out``, returns Figure."""
    fig, (ax,) = new_figure(1, width=11.0, row_height=6.4)
    k = len(class_names)
    from matplotlib import colormaps

    colours = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=colours(c / max(k - 1, 1) if k > 20 else c), label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if k <= 30:
        ax.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save_figure(fig, out)
    return fig


def val_features(frozen: FrozenBackbone, split: EvalSplit, batch_size: int, cache: FeatureCache,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """{'x': (N, D), 'y': (N,)} of ``split``, cached under eval.py knn's key for its query split."""
    parts = {"size": split.size, "resize": split.resize, "split": "val"}

    def compute() -> dict[str, torch.Tensor]:
        x, y = embed_split(frozen, split, batch_size)
        return {"x": x, "y": y}

    return cache.get_or_compute("val", parts, compute, device, split.path)


def tsne_of_split(frozen: FrozenBackbone, split: EvalSplit, batch_size: int, cache: FeatureCache, out: str, *,
                  max_images: int = 0, perplexity: float = 30.0, seed: int = 0, title: str = "") -> dict:
    """Extract (or reuse) features, embed, plot to ``out``; returns the results dict (numbers and timings)."""
    from sklearn.manifold import trustworthiness

    t0 = time.perf_counter()
    feats = val_features(frozen, split, batch_size, cache, frozen.device)
    t_feat = time.perf_counter() - t0
    labels = feats["y"].cpu().numpy()
    keep = subsample(labels, max_images, seed)
    x = feats["x"][torch.as_tensor(keep)]
    t1 = time.perf_counter()
    xy, used = tsne_map(x, perplexity, seed)
    t_tsne = time.perf_counter() - t1
    names = split.classes or [str(c) for c in range(split.num_classes)]
    plot_map(xy, labels[keep], names, title or f"t-SNE of {split.path} ({len(keep)} images)", out)
    xn = torch.nn.functional.normalize(x.float(), dim=1).cpu().numpy()
    k = max(1, min(5, (len(keep) - 1) // 2))  # scikit-learn needs k < N / 2
    trust = float(trustworthiness(xn, xy, n_neighbors=k))
    return {"png": out, "images": int(len(keep)), "classes": len(names), "perplexity": used, "seed": seed,
            "trustworthiness": trust, "trustworthiness_k": k, "feature_seconds": t_feat, "tsne_seconds": t_tsne,
            "seconds": time.perf_counter() - t0, "features_cached": bool(cache.hits)}
