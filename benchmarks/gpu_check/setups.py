"""The training setups the GPU check runs (configs/exp recipes with the check's loader, data and precision) and the
synthetic ImageNet-like JPEGs they read, written inside the budget (nothing is downloaded).

Recipes: DINO ResNet-50 and DINO ViT-S/16 with 2 x 224 + 6 x 96 crops (configs/exp/dino_in1k.yaml and
dino_vits_in1k.yaml with 6 local crops instead of 8), INTL ResNet-50 with 2 x 224 (configs/exp/intl_in1k.yaml).
The loader is the torchvision one (decode + crop + flip in worker processes, colour ops batched on the device by
``DeviceAugment``): FFCV and DALI are not part of the GPU machine's image. ``tiny=True`` (CPU self-test) swaps in
ResNet-18, narrow heads and 32/16 px crops.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os

import numpy as np

from engine.config import Config, load_config
from runtime.atomic import atomic_path

RECIPES = {  # name -> (method, experiment config, local crops or None to keep the config's)
    "dino_rn50": ("dino", "configs/exp/dino_in1k.yaml", 6),
    "dino_vits": ("dino", "configs/exp/dino_vits_in1k.yaml", 6),
    "intl_rn50": ("intl", "configs/exp/intl_in1k.yaml", None),
}
TINY = {
    "dino": ["model.backbone=resnet18", "ssl.out_dim=256", "ssl.hidden_dim=64", "ssl.bottleneck_dim=32",
             "data.views=[{role: global, count: 2, size: 32, scale: [0.3, 1.0]}, {role: local, count: 2, size: 16}]"],
    "intl": ["model.backbone=resnet18", "ssl.proj_hidden_dim=64", "ssl.emb_dim=64",
             "data.views=[{role: global, count: 2, size: 32, scale: [0.3, 1.0]}]"],
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_config(recipe: str, train_path: str, out_dir: str, batch_size: int, *, precision: str = "fp32",
                 channels_last: bool = True, compile: bool = False, workers: int = 0, tiny: bool = False,
                 device: str = "cuda") -> Config:
    """The resolved config of one setup (single process, no SyncBN, no TensorBoard, no kNN at the end)."""
    method, exp, n_local = RECIPES[recipe]
    overrides = [
        "data.loader=torchvision", f"data.train_path={train_path}", f"data.batch_size={batch_size}",
        f"data.workers={workers}", f"model.precision={precision}", f"model.channels_last={str(channels_last).lower()}",
        f"model.compile={str(compile).lower()}", "model.sync_bn=false", f"train.device={device}",
        f"train.out_dir={out_dir}", "train.tensorboard=false", "train.knn_at_end=false", "optim.warmup_epochs=1",
        "train.epochs=2",
    ]
    cfg = load_config(method, [os.path.join(ROOT, exp)], overrides + (TINY[method] if tiny else []))
    if n_local is not None and not tiny:
        cfg.data.views = [v if v.role == "global" else dataclasses.replace(v, count=n_local) for v in cfg.data.views]
    return cfg


def _write_one(task: tuple[str, int, int]) -> None:
    from PIL import Image

    from benchmarks.loader import render_texture

    path, index, size = task
    rng = np.random.default_rng(index)
    h, w = (int(x) for x in rng.integers(int(size * 0.88), int(size * 1.12) + 1, 2))
    with atomic_path(path) as tmp:  # a killed run leaves no truncated JPEG behind
        Image.fromarray(render_texture(rng, h, w)).save(tmp, format="JPEG", quality=90)


def write_jpegs(folder: str, n: int, size: int = 430, processes: int | None = None, classes: int = 10) -> str:
    """An ImageFolder of ``n`` textured JPEGs (~``size`` px, quality 90: ImageNet-like decode cost); files that
    exist already are kept. Returns ``folder``."""
    tasks = [(os.path.join(folder, f"class{i % classes:02d}", f"img{i:06d}.jpg"), i, size) for i in range(n)]
    for d in {os.path.dirname(t[0]) for t in tasks}:
        os.makedirs(d, exist_ok=True)
    todo = [t for t in tasks if not os.path.exists(t[0])]
    if todo:
        with multiprocessing.get_context("fork").Pool(processes or os.cpu_count() or 1) as pool:
            pool.map(_write_one, todo, chunksize=8)
    return folder
