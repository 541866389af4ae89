"""[0]-[2] Data: dataset conversion, loaders (torchvision baseline, FFCV, DALI) and device-side augmentation.

``build_loader`` is the only entry point the trainer uses; every loader yields :class:`pipeline.batch.Batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import DataConfig
from runtime.config_loader import ConfigError


def build_loader(cfg: DataConfig, *, seed: int, rank: int, world_size: int, device: torch.device,
                 indices: Sequence[int] | None = None):
    """Dispatch on ``cfg.loader``. Returns an object with ``__len__`` and ``epoch_iter(epoch, start)``.

    ``indices``: read only these dataset samples (a labelled subset for ``eval.py semi``); None = all of them.
    """
    kwargs = dict(seed=seed, rank=rank, world_size=world_size, device=device)
    if indices is not None:
        if cfg.loader == "dali":
            raise ConfigError("data.loader: a sample subset needs the torchvision or ffcv loader, not dali")
        kwargs["indices"] = indices
    if cfg.loader == "torchvision":
        from pipeline.load.torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(cfg, **kwargs)
    if cfg.loader == "ffcv":
        from pipeline.load.ffcv_loader import build_ffcv_loader

        return build_ffcv_loader(cfg, **kwargs)
    if cfg.loader == "dali":
        from pipeline.load.dali_loader import build_dali_loader

        return build_dali_loader(cfg, **kwargs)
    raise ValueError(f"data.loader: unknown loader {cfg.loader!r}")
