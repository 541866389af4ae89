"""Online linear probe (``train.online_probe=true``): a classifier trained alongside SSL on detached features.

MV-MR's ``OnlineFineTuner`` and solo-learn's online classifier: ``Linear(D, C)`` on the pooled backbone features of
the step's first view, trained with its own optimiser (Adam, ``train.online_probe_lr``; MV-MR uses Adam 1e-4) from
the batch labels, one step per SSL step. Its running top-1 over each logging window is logged with the loss
(``probe_top1``, ``probe_loss``), and at every epoch end it is evaluated on ``eval.val_dir`` (resize + center-crop,
the backbone in eval mode): ``probe_val_top1`` / ``probe_val_top5``.

It cannot change SSL training: the features are taken by a forward hook on the backbone's pooling module (the
collapse monitor's hook point) from the forward the SSL step runs anyway, detached, so no gradient flows back and no
extra forward touches BatchNorm statistics; the head's initialisation uses its own generator (the global RNG stream
stays as it is); its optimiser holds only the head. Its state (head, optimiser, window counters) is checkpointed.
Distributed: head gradients are averaged over ranks before each step, so every rank holds the same head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.collapse import PooledFeatureTap
from runtime import dist


class OnlineProbe(PooledFeatureTap):
    """Trains ``Linear(dim, num_classes)`` on the first ``rows`` pooled features the backbone emits per armed step."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, rows: int, lr: float, device: torch.device,
                 seed: int = 0):
        super().__init__(backbone, rows)
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes).to(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():  # N(0, 0.01) weights, zero bias (the linear-probe init), from a private generator
            self.head.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)
            self.head.bias.zero_()
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self.window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count

    def step(self, labels: torch.Tensor, read: bool) -> dict[str, torch.Tensor]:
        """One optimiser step of the head on the kept features (B, D) and ``labels`` (B,).

        Returns ``probe_loss`` / ``probe_top1`` (the window's mean loss and top-1 %, as device tensors) when
        ``read`` (a logging step, which also starts a new window), else {}.
        """
        feats = self.take()  # armed before the SSL forward (see PooledFeatureTap)
        if feats is None:
            raise RuntimeError("online probe: the backbone produced no pooled (B, D) output this step; the probe needs "
                               "a timm backbone with global pooling (set train.online_probe=false)")
        labels = labels[: feats.shape[0]]
        logits = self.head(feats.float())
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_dist():
            for p in self.head.parameters():
                dist.all_reduce_mean(p.grad)
        self.optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
            self.window += torch.stack([loss.detach().double() * labels.numel(), correct.double(),
                                        torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)])
        if not read:
            return {}
        totals = self.window.clone()
        dist.all_reduce_sum(totals)
        self.window.zero_()
        n = totals[2].clamp_min(1)
        return {"probe_loss": (totals[0] / n).float(), "probe_top1": (100 * totals[1] / n).float()}

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, val_dir: str, size: int, mean, std, batch_size: int, workers: int,
                 channels_last: bool = False) -> dict[str, float]:
        """top-1 / top-5 (%) of the head on ``val_dir`` (resize + center-crop); the backbone's mode is restored."""
        from evaluation.eval_loaders import build_eval_split
        from evaluation.features import FrozenBackbone
        from evaluation.linear import evaluate

        device = self.head.weight.device
        split = build_eval_split(val_dir, size, round(size * 256 / 224), workers, "eval.val_dir")
        if int(split.labels.max()) >= self.num_classes:
            raise ValueError(f"eval.val_dir: {val_dir} has labels up to {int(split.labels.max())} but the online "
                             f"probe was built for {self.num_classes} classes of the training data")
        frozen = FrozenBackbone(backbone, device, tuple(mean), tuple(std), None, channels_last)
        try:
            res = evaluate(frozen, self.head, split, batch_size)
        finally:
            frozen.release()
        return {"probe_val_top1": res["top1"], "probe_val_top5": res["top5"]}

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "window": self.window.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.window.copy_(state["window"])


def count_classes(train_path: str) -> int:
    """Classes of the training data: ImageFolder class directories, or the labels of a .beton (classes.json)."""
    from evaluation.eval_loaders import build_eval_split

    return build_eval_split(train_path, 8, 8, 0, "data.train_path").num_classes


def build_online_probe(cfg, method: nn.Module, device: torch.device) -> OnlineProbe | None:
    """The probe for a run config (None unless ``train.online_probe``); ConfigError for unusable settings."""
    from runtime.config_loader import ConfigError

    if not cfg.train.online_probe:
        return None
    if cfg.model.compile:
        raise ConfigError("train.online_probe: needs model.compile=false (its feature hook cannot run inside a "
                          "compiled graph)")
    if cfg.data.loader == "dali":
        raise ConfigError("train.online_probe: reads the class count from an ImageFolder or .beton; "
                          "data.loader=dali is not supported")
    from evaluation.eval_loaders import data_kind
    from models.backbone import feature_dim

    data_kind(cfg.eval.val_dir, "eval.val_dir")  # fail now, not after the first epoch
    backbone = method.student.backbone
    return OnlineProbe(backbone, feature_dim(backbone), count_classes(cfg.data.train_path), cfg.data.batch_size,
                       cfg.train.online_probe_lr, device, cfg.train.seed)
