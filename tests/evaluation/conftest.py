"""Fixtures for the evaluation tests: a tiny DINO checkpoint, the tiny ImageFolder as .beton files, and synthetic
linearly separable "images" with fake loaders (no decoding) for the probe-training checks."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.eval_loaders import EvalSplit
from pipeline.batch import Batch
from pipeline.load.order import shard_indices
from tests.conftest import TINY_OVERRIDES

EVAL_OVERRIDES = [*TINY_OVERRIDES, "data.eval_size=32", "eval.batch_size=16"]


def save_tiny_checkpoint(path: str, method: str = "dino", overrides: list[str] | None = None, seed: int = 0) -> str:
    """Build a method from the tiny config and save it in the trainer's checkpoint format (no training needed)."""
    from engine.config import config_to_dict, load_config
    from methods import build_method
    from runtime.checkpoint import atomic_save

    cfg = load_config(method, [], EVAL_OVERRIDES + list(overrides or []))
    torch.manual_seed(seed)
    model = build_method(cfg)
    atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "step": 3,
                 "meta": {"method": method, "backbone": cfg.model.backbone, "format": 1}}, path)
    return path


def write_beton(folder: str, out: str) -> str:
    """An ImageFolder written with ffcv's stock writer (fields image: RGBImageField jpg, label: IntField)."""
    from pipeline.load.ffcv_compat import run_ffcv_writer  # noqa: I001  (first: checks ffcv, keeps threads)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(folder)

    class _Arrays:
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            img, label = ds[i]
            return np.asarray(img), label

    writer = DatasetWriter(out, {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()},
                           num_workers=1)
    run_ffcv_writer(writer, _Arrays(), out)  # ffcv's own loop would poll forever if its process died (a full disk)
    return out


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one intra-op thread is faster, and far faster on a machine shared with other jobs."""


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("eval_run")
    return save_tiny_checkpoint(str(run / "ckpt_step00000003.pt"))


@pytest.fixture(scope="session")
def tiny_betons(tiny_folder, tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp("betons")
    return (write_beton(os.path.join(tiny_folder, "train"), str(out / "train.beton")),
            write_beton(os.path.join(tiny_folder, "val"), str(out / "val.beton")))


# ------------------------------------------------------------------ synthetic separable data, fake loaders
def separable_images(n: int, classes: int = 4, seed: int = 0, noise: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 4, 4) "images" whose flattened pixels are linearly separable by class (well-separated means,
    Gaussian pixel noise of std ``noise``; the default keeps the classes separable)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randint(40, 216, (classes, 48), generator=g).float()
    labels = torch.arange(n) % classes
    x = means[labels] + noise * torch.randn(n, 48, generator=torch.Generator().manual_seed(seed + 1))
    return x.clamp(0, 255).round().to(torch.uint8).view(n, 3, 4, 4), labels


class FlatBackbone(nn.Module):
    """Frozen "backbone": flattened normalised pixels (48-d features)."""

    num_features = 48

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class TensorSplit(EvalSplit):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.classes = images, labels.numpy(), None
        self.path, self.size, self.resize = "synthetic", 4, 4

    def batches(self, indices, batch_size):
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        for chunk in idx.split(batch_size):
            yield self.images[chunk], torch.as_tensor(self.labels)[chunk]


class TensorLoader:
    """The training-loader interface over tensors: global batch ``batch * world`` drawn from a (seed, epoch)
    permutation; rank r takes rows r, r + world, ... of each global batch."""

    def __init__(self, images, labels, batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.images, self.labels, self.batch = images, labels, batch
        self.rank, self.world, self.seed = rank, world, seed

    def __len__(self) -> int:
        return len(self.labels) // (self.batch * self.world)

    def epoch_iter(self, epoch: int):
        order = shard_indices(len(self.labels), self.batch, self.seed, epoch, self.rank, self.world)
        for idx in torch.from_numpy(order).split(self.batch):
            yield Batch([self.images[idx]], self.labels[idx], idx, 1)
