"""[1] Loaders for evaluation: deterministic resize + center-crop splits and the random-resized-crop probe train loader.

Two storage formats behind one interface, chosen by the path: a directory is a torchvision ``ImageFolder``
(``<root>/<class>/<image>``), a file is an FFCV ``.beton`` (fields ``image``: RGBImageField, ``label``: IntField,
as written by ``convert_dataset.py``).

* :class:`EvalSplit` (validation images, kNN banks, cached probe features): ``Resize(resize)`` (shorter side) +
  ``CenterCrop(size)``. ImageFolder: PIL bicubic resize (the DINO/SCFS protocol). FFCV: ffcv's stock
  ``CenterCropRGBImageDecoder`` (center square of side ``min(h, w) * size / resize``, resized to ``size`` with
  OpenCV ``INTER_AREA``): the same geometry with a different resampling kernel.
* :func:`build_probe_train_loader`: ``RandomResizedCrop(size, scale) + horizontal flip``, via the training loaders
  (``pipeline.build_loader`` with one view and no colour ops) so sample order, rank sharding and crop randomness are
  a function of (seed, epoch, index) exactly as in pre-training.

Every batch is ``(images uint8 (B, 3, S, S), labels int64 (B,))`` on the CPU, owned by the caller (safe to keep after
the next batch); :func:`normalize` turns images into the backbone input on the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.config import DataConfig, ViewConfig
from runtime.config_loader import ConfigError


def data_kind(path: str, what: str) -> str:
    """'folder' for a directory, 'ffcv' for a file; ConfigError naming ``what`` and the path otherwise."""
    if os.path.isdir(path):
        return "folder"
    if os.path.isfile(path):
        return "ffcv"
    raise ConfigError(f"{what}: {path!r} does not exist (expected an ImageFolder directory <root>/<class>/<image> "
                      "or a .beton file written by convert_dataset.py)")


def rank_indices(n: int, rank: int, world_size: int, pad: bool) -> list[int]:
    """Samples ``rank, rank + W, ...`` of ``range(n)``; with ``pad`` every rank gets ceil(n / W) (last index repeated).

    The padded layout is what :func:`evaluation.features.gather_in_order` undoes after an all-gather.
    """
    if not pad:
        return list(range(rank, n, world_size))
    per_rank = (n + world_size - 1) // world_size
    return [min(i, n - 1) for i in range(rank, per_rank * world_size, world_size)]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W) on ``device``, ``(x / 255 - mean) / std``."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = x.sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class EvalSplit:
    """A labelled split read with resize + center-crop. Attributes: path, size (crop side), resize, n, labels (n,)
    int64, classes (names, or None for a .beton without classes.json), num_classes."""

    path: str
    size: int
    resize: int
    labels: np.ndarray
    classes: list[str] | None

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else int(self.labels.max()) + 1

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Images of ``indices`` in that order: ``(uint8 (B, 3, S, S), int64 (B,))`` CPU batches."""
        raise NotImplementedError


class FolderSplit(EvalSplit):
    def __init__(self, root: str, size: int, resize: int, workers: int, what: str):
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                        T.PILToTensor()])
        try:
            self.folder = ImageFolder(root, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"{what}: {root!r} is not a usable ImageFolder: {e}") from None
        self.path, self.size, self.resize, self.workers = root, size, resize, workers
        self.labels = np.asarray(self.folder.targets, dtype=np.int64)
        self.classes = list(self.folder.classes)

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(Subset(self.folder, list(indices)), batch_size=batch_size, shuffle=False,
                            num_workers=self.workers)
        yield from loader


class BetonSplit(EvalSplit):
    def __init__(self, path: str, size: int, resize: int, workers: int, what: str):
        from pipeline.load.ffcv_compat import field_metadata  # noqa: I001  (first: checks ffcv, keeps threads)
        from ffcv.reader import Reader

        from pipeline.load.ffcv_loader import check_beton

        try:
            check_beton(path)
        except ConfigError as e:  # re-label: check_beton names data.train_path
            raise ConfigError(str(e).replace("data.train_path", what, 1)) from None
        self.path, self.size, self.resize, self.workers = path, size, resize, workers
        self.labels = np.asarray(field_metadata(Reader(path), "label"), dtype=np.int64).reshape(-1)
        self.classes = _beton_class_names(path, self.labels)

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from pipeline.load.ffcv_compat import torch_threads_kept  # noqa: I001  (first: checks ffcv, keeps threads)
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        if len(indices) == 0:
            return
        decoder = CenterCropRGBImageDecoder((self.size, self.size), self.size / self.resize)
        with torch_threads_kept():  # ffcv resizes torch's intra-op pool to num_workers, here and at iter()
            loader = Loader(self.path, batch_size=batch_size, num_workers=max(1, self.workers), os_cache=True,
                            order=OrderOption.SEQUENTIAL, indices=np.asarray(indices, dtype=np.int64),
                            drop_last=False, pipelines={"image": [decoder], "label": [IntDecoder()]})
            for images, labels in loader:
                # FFCV reuses its output buffers for later batches: copy, so a caller may keep batches (the kNN bank
                # collects every batch's labels; views of the buffers gave it later batches' labels)
                yield (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                       torch.from_numpy(labels.reshape(-1).copy()))


def _beton_class_names(path: str, labels: np.ndarray) -> list[str] | None:
    """Class names from the ``classes.json`` convert_dataset.py writes next to the .beton (None if absent)."""
    import json

    for candidate in (os.path.splitext(path)[0] + ".classes.json", os.path.join(os.path.dirname(path), "classes.json")):
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                return None
            names = data.get("classes") if isinstance(data, dict) else data
            if isinstance(names, list) and len(names) > int(labels.max(initial=-1)):
                return [str(c) for c in names]
    return None


def build_eval_split(path: str, size: int, resize: int, workers: int, what: str) -> EvalSplit:
    """The resize + center-crop split of ``path`` (directory = ImageFolder, file = .beton)."""
    if size < 8 or resize < size:
        raise ConfigError(f"{what}: need crop size >= 8 and resize >= size, got size={size} resize={resize}")
    split_cls = FolderSplit if data_kind(path, what) == "folder" else BetonSplit
    split = split_cls(path, size, resize, workers, what)
    if split.n == 0:
        raise ConfigError(f"{what}: {path!r} contains no images")
    return split


def check_same_classes(train: EvalSplit, val: EvalSplit, num_classes: int | None = None) -> int:
    """Number of classes shared by both splits; ValueError naming both paths when they disagree."""
    n_train, n_val = train.num_classes, val.num_classes
    if train.classes is not None and val.classes is not None and train.classes != val.classes:
        diff = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise ValueError(f"class lists differ between {train.path} ({n_train} classes) and {val.path} ({n_val} "
                         f"classes); e.g. {diff}")
    if int(val.labels.max()) >= n_train:
        raise ValueError(f"{val.path} has labels up to {int(val.labels.max())} but {train.path} has only {n_train} "
                         "classes (mismatched number of classes)")
    if num_classes is not None and num_classes != n_train:
        raise ValueError(f"--num-classes {num_classes} does not match the {n_train} classes of {train.path}")
    return n_train


def build_probe_train_loader(path: str, *, size: int, scale: tuple[float, float], interpolation: str,
                             batch_size: int, workers: int, seed: int, rank: int, world_size: int,
                             mean: Sequence[float], std: Sequence[float], indices: Sequence[int] | None = None):
    """RandomResizedCrop(size, scale) + flip batches of ``path`` (the training loaders with one crop-only view).

    ``indices``: train on these samples only (the labelled subset of ``eval.py semi``); None = the whole split.

    Returns the loader interface of ``pipeline.build_loader``: ``len(loader)`` full batches per rank and
    ``epoch_iter(epoch)`` yielding :class:`pipeline.batch.Batch` with ``views[0]`` uint8 (B, 3, size, size).
    """
    from pipeline import build_loader

    kind = data_kind(path, "probe train data")
    view = ViewConfig("global", 1, size, scale, flip_p=0.5, jitter_p=0.0, grayscale_p=0.0)
    data = DataConfig(loader="ffcv" if kind == "ffcv" else "torchvision", train_path=path, batch_size=batch_size,
                      workers=workers, views=[view], device_augment=True, interpolation=interpolation,
                      mean=tuple(mean), std=tuple(std))
    try:
        return build_loader(data, seed=seed, rank=rank, world_size=world_size, device=torch.device("cpu"),
                            indices=indices)
    except ConfigError as e:  # the training loaders name training keys; say which probe setting is meant
        msg = str(e).replace("data.train_path", "probe train data", 1).replace("data.batch_size", "batch_size", 1)
        raise ConfigError(msg) from None
