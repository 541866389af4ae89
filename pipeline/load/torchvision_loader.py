"""[1] The baseline loader: torchvision ImageFolder + PIL multi-crop transforms in a DataLoader.

This is how the methods' official repositories load data, and the reference every fast loader is compared with.
Two modes (``DataConfig.device_augment``):
- False: the whole recipe (crop, flip, jitter, grayscale, blur, solarize, normalise) in PIL per image in workers;
  the batch arrives ``augmented``.
- True: PIL does decode + crop + flip only and returns uint8 crops; colour ops run batched on the device later.

Sample order and every random draw depend only on ``(seed, epoch, index)``: each sample reseeds the worker's RNGs,
so the result does not depend on the number of workers and a resumed run can restart at any batch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from pipeline.batch import Batch
from pipeline.config import DataConfig
from pipeline.load.order import batches_per_rank, shard_indices
from pipeline.load.pil_transforms import build_pil_view_transform
from runtime.config_loader import ConfigError
from runtime.seeding import Stream, derive_seed


class MultiCropFolder(Dataset):
    """ImageFolder whose items are ``(views, label, index)``; each image is decoded once, all crops cut from it."""

    def __init__(self, root: str, cfg: DataConfig, seed: int):
        if not os.path.isdir(root):
            raise ConfigError(f"data.train_path: {root!r} is not a directory (the torchvision loader reads an "
                              "ImageFolder tree: <root>/<class>/<image>)")
        try:
            self.folder = ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"data.train_path: {root!r} is not a usable ImageFolder: {e}") from None
        crop_only = cfg.device_augment
        self.transforms = [build_pil_view_transform(v, cfg.mean, cfg.std, cfg.interpolation, crop_only)
                           for v in cfg.expanded_views()]
        self.seed = seed
        self.subset: list[int] | None = None  # dataset indices to read (None = all), set by TorchvisionLoader

    def __len__(self) -> int:
        return len(self.folder) if self.subset is None else len(self.subset)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        if self.subset is not None:  # crops and the reported index follow the image, not its position in the subset
            index = self.subset[index]
        s = derive_seed(Stream.SAMPLE_TRANSFORM, self.seed, epoch, index)
        random.seed(s)
        torch.manual_seed(s)
        path, label = self.folder.samples[index]
        img = self.folder.loader(path)  # PIL RGB, decoded once
        return [t(img) for t in self.transforms], label, index


class EpochSampler(Sampler):
    """Yields ``(index, epoch)`` for this rank's share of a (seed, epoch)-seeded permutation, from batch ``start``.

    drop_last semantics: every rank gets ``len(self)`` samples, a whole number of batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.start = 0, 0
        self.batches = batches_per_rank(n, batch_size, world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int) -> list[int]:
        return shard_indices(self.n, self.batch_size, self.seed, epoch, self.rank, self.world).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices(self.epoch)[self.start * self.batch_size :]:
            yield i, self.epoch

    def __len__(self) -> int:
        return (self.batches - self.start) * self.batch_size


def collate(n_global: int, augmented: bool):
    def fn(samples) -> Batch:
        views = [torch.stack([s[0][v] for s in samples]) for v in range(len(samples[0][0]))]
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        indices = torch.tensor([s[2] for s in samples], dtype=torch.int64)
        return Batch(views, labels, indices, n_global, augmented)

    return fn


class TorchvisionLoader:
    """The loader interface: ``len(loader)`` batches per epoch per rank and ``epoch_iter(epoch, start)``."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int, device: torch.device,
                 indices: Sequence[int] | None = None):
        self.dataset = MultiCropFolder(cfg.train_path, cfg, seed)
        if indices is not None:  # a subset: position i of the sampler is image indices[i] of the folder
            self.dataset.subset = [int(i) for i in indices]
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            self.dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
            collate_fn=collate(cfg.n_global, not cfg.device_augment), pin_memory=device.type == "cuda",
            drop_last=True, persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None,
        )

    def __len__(self) -> int:
        return self.sampler.batches

    def epoch_iter(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch, start)
        return iter(self.loader)
