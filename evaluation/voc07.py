"""``eval.py voc07``: PASCAL VOC2007 multi-label classification with linear SVMs on frozen features.

Protocol (the linear-SVM transfer benchmark of Goyal et al. 2019, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning", used across the SSL literature for VOC07):

1. Features of every ``trainval`` and ``test`` image: the frozen backbone's pooled output on Resize(size*256/224,
   bicubic) + CenterCrop(size) (the kNN transform; size = the checkpoint's ``data.eval_size``), L2-normalised.
2. Per class, a binary ``sklearn.svm.LinearSVC`` (squared hinge, L2, positive class weight 2) for each cost C of a
   sweep; the cost with the best mean AP over a k-fold split of ``trainval`` (stratified, seeded) is refit on all of
   ``trainval``. Images labelled -1 (difficult) are left out of training and of every AP.
3. Test AP per class and the mean over the 20 classes, in both the VOC2007 11-point definition (the official
   metric of the VOC2007 devkit, reported as ``map``) and the area under the interpolated PR curve (VOC2010+ devkit,
   ``map_area``); see :mod:`evaluation.voc_ap`.

Directory layout read (VOCdevkit/VOC2007): ``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<class>_<split>.txt`` with
lines ``<id> <label>``, label 1 / 0 / -1. Every problem (missing file, class, image, bad label) is a ConfigError
naming the path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evaluation.eval_loaders import EvalSplit
from evaluation.voc_ap import ap_11point, ap_area
from runtime.config_loader import ConfigError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
DEFAULT_COSTS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def read_voc_split(root: str, split: str, classes: Sequence[str] = VOC_CLASSES) -> tuple[list[str], np.ndarray]:
    """(image ids, labels (N, C) int8 in {1, 0, -1}) of ``split`` from ``ImageSets/Main/<class>_<split>.txt``."""
    main = os.path.join(root, "ImageSets", "Main")
    if not os.path.isdir(main):
        raise ConfigError(f"--voc-dir: {root!r} has no ImageSets/Main directory (expected a VOCdevkit/VOC2007 "
                          "folder with JPEGImages/ and ImageSets/Main/<class>_{trainval,test}.txt)")
    ids: list[str] | None = None
    columns = []
    for cls in classes:
        path = os.path.join(main, f"{cls}_{split}.txt")
        if not os.path.isfile(path):
            raise ConfigError(f"--voc-dir: missing class file {path} (class {cls!r}, split {split!r})")
        names, labels = _read_class_file(path)
        if ids is None:
            ids = names
        elif names != ids:
            diff = sorted(set(names) ^ set(ids))[:3]
            raise ConfigError(f"--voc-dir: {path} lists other images than {classes[0]}_{split}.txt (e.g. {diff})")
        columns.append(labels)
    assert ids is not None
    if not ids:
        raise ConfigError(f"--voc-dir: split {split!r} in {main} lists no images")
    jpegs = os.path.join(root, "JPEGImages")
    missing = [i for i in ids if not os.path.isfile(os.path.join(jpegs, f"{i}.jpg"))]
    if missing:
        raise ConfigError(f"--voc-dir: {len(missing)} image(s) of split {split!r} missing from {jpegs}, e.g. "
                          f"{missing[0]}.jpg")
    return ids, np.stack(columns, axis=1).astype(np.int8)


def _read_class_file(path: str) -> tuple[list[str], list[int]]:
    names, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise ConfigError(f"--voc-dir: {path}:{n}: expected '<image id> <1|0|-1>', got {line.strip()!r}")
            names.append(parts[0])
            labels.append(int(parts[1]))
    return names, labels


class _Images(Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


class VOCSplit(EvalSplit):
    """VOC images of one split as an EvalSplit (resize + center-crop, as FolderSplit); ``targets`` (N, 20) int8."""

    def __init__(self, root: str, split: str, size: int, resize: int, workers: int):
        from torchvision import transforms as T

        self.ids, self.targets = read_voc_split(root, split)
        self.path, self.size, self.resize, self.workers = root, size, resize, workers
        self.labels = np.zeros(len(self.ids), dtype=np.int64)  # single-label API of EvalSplit: unused
        self.classes = None
        tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                        T.PILToTensor()])
        self.images = _Images([os.path.join(root, "JPEGImages", f"{i}.jpg") for i in self.ids], tf)

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import Subset

        yield from DataLoader(Subset(self.images, list(indices)), batch_size=batch_size, num_workers=self.workers)


def _fold_ids(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified fold index per sample (positives and negatives dealt round-robin after a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    for value in (True, False):
        idx = np.flatnonzero(y == value)
        out[rng.permutation(idx)] = np.arange(len(idx)) % folds
    return out


def _svm(cost: float, x: np.ndarray, y: np.ndarray):
    from sklearn.svm import LinearSVC

    # dual="auto": liblinear's primal Newton solver when samples outnumber features (VOC07: 5011 vs 2048), which
    # converges in tens of iterations at any cost; the dual coordinate solver needed >2000 at C=100 (measured)
    return LinearSVC(C=cost, class_weight={1: 2, 0: 1}, loss="squared_hinge", tol=1e-4, max_iter=2000,
                     dual="auto").fit(x, y)


def fit_class(x: np.ndarray, labels: np.ndarray, costs: Sequence[float], folds: int, seed: int):
    """Best-cost SVM of one class: (model, cost, {cost: mean cross-validated 11-point AP}). labels in {1, 0, -1}."""
    keep = labels != -1
    x, y = x[keep], labels[keep] == 1
    n_pos = int(y.sum())
    if n_pos < folds or len(y) - n_pos < folds:
        raise ConfigError(f"need at least {folds} positive and negative trainval images per class for {folds}-fold "
                          f"cross-validation, got {n_pos} / {len(y) - n_pos}; lower --folds")
    fold = _fold_ids(y, folds, seed)
    cv = {}
    for cost in costs:
        aps = [ap_11point(_svm(cost, x[fold != f], y[fold != f]).decision_function(x[fold == f]),
                          y[fold == f].astype(np.int8)) for f in range(folds)]
        cv[cost] = float(np.mean(aps))
    best = max(costs, key=lambda c: (cv[c], -c))  # ties: the smaller cost (stronger regularisation)
    return _svm(best, x, y), best, cv


def _test_class(train_x, train_y, test_x, test_y, costs, folds, seed) -> dict:
    model, cost, cv = fit_class(train_x, train_y, costs, folds, seed)
    scores = model.decision_function(test_x)
    return {"ap": 100 * ap_11point(scores, test_y), "ap_area": 100 * ap_area(scores, test_y), "cost": cost,
            "cv_ap": {str(k): 100 * v for k, v in cv.items()}}


def voc07_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, seed: int = 0,
              classes: Sequence[str] = VOC_CLASSES, jobs: int = 1) -> dict:
    """Per-class SVMs on (N, D) features with (N, C) {1, 0, -1} labels -> per-class and mean AP (both definitions).

    ``jobs`` classes are trained in parallel (joblib processes; -1 = all cores); results do not depend on it.
    """
    from joblib import Parallel, delayed
    from tqdm import tqdm

    empty = [name for c, name in enumerate(classes) if not (test_y[:, c] == 1).any()]
    if empty:
        raise ConfigError(f"classes {empty} have no positive test image: their AP is undefined")
    tasks = (delayed(_test_class)(train_x, train_y[:, c], test_x, test_y[:, c], costs, folds, seed)
             for c in range(len(classes)))
    results = Parallel(n_jobs=jobs, return_as="generator")(tasks)
    per_class = dict(zip(classes, tqdm(results, total=len(classes), desc="voc07 svm", unit="class")))
    return {"map": float(np.mean([r["ap"] for r in per_class.values()])),
            "map_area": float(np.mean([r["ap_area"] for r in per_class.values()])), "per_class": per_class}


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.double(), dim=1).numpy()


def voc07_of_backbone(frozen, voc_dir: str, size: int, batch_size: int, workers: int, cache, device,
                      costs: Sequence[float], folds: int, seed: int, splits: tuple[str, str], jobs: int = 1) -> dict:
    """Embed the two splits (through ``cache``), train and test the SVMs. ``frozen``: FrozenBackbone."""
    from evaluation.features import embed_split

    t0 = time.perf_counter()
    resize = round(size * 256 / 224)
    feats = {}
    for split in splits:
        data = VOCSplit(voc_dir, split, size, resize, workers)
        x = cache.get_or_compute(f"voc07_{split}", {"size": size, "resize": resize, "split": f"voc07:{split}"},
                                 lambda d=data: {"x": embed_split(frozen, d, batch_size)[0]}, device, voc_dir)["x"]
        feats[split] = (l2_normalize(x.cpu()), data.targets)
    t1 = time.perf_counter()
    res = voc07_svm(*feats[splits[0]], *feats[splits[1]], costs=costs, folds=folds, seed=seed, jobs=jobs)
    res.update(train_images=len(feats[splits[0]][1]), test_images=len(feats[splits[1]][1]), crop=[size, resize],
               costs=list(costs), folds=folds, feature_seconds=t1 - t0, svm_seconds=time.perf_counter() - t1)
    return res


def add_voc07_parser(sub, add_common, add_cache) -> None:
    p = sub.add_parser("voc07", help="VOC2007 multi-label classification: linear SVMs on frozen features, mAP")
    add_common(p)
    p.add_argument("--voc-dir", required=True, help="VOCdevkit/VOC2007 directory (JPEGImages/, ImageSets/Main/)")
    p.add_argument("--train-split", default="trainval")
    p.add_argument("--test-split", default="test")
    p.add_argument("--costs", type=float, nargs="+", default=list(DEFAULT_COSTS), help="SVM cost sweep")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds of the cost selection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="classes trained in parallel (-1 = all cores)")
    p.add_argument("--size", type=int, default=0, help="center-crop side; 0 = the checkpoint's data.eval_size")
    p.add_argument("--out", default=None, help="results JSON (default <run dir>/voc07_eval.json)")
    add_cache(p)


def print_voc07(res: dict, out: str) -> None:
    print(f"\nVOC07 linear SVM: {res.get('method', '?')} {res.get('backbone', '?')}, {res['train_images']} train / "
          f"{res['test_images']} test images")
    for name, r in res["per_class"].items():
        print(f"  {name:<12} AP {r['ap']:6.2f}  (area {r['ap_area']:6.2f}, C={r['cost']:g})")
    print(f"mAP (VOC07 11-point) {res['map']:.2f}   mAP (area under PR) {res['map_area']:.2f}   features "
          f"{res['feature_seconds']:.1f} s, SVMs {res['svm_seconds']:.1f} s; results: {out}\n")
