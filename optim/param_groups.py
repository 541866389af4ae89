"""Parameter groups: no weight decay (and no LARS adaptation) for biases and normalisation parameters."""

from __future__ import annotations

from torch import nn


def split_decay_groups(model: nn.Module) -> list[dict]:
    """Two groups over the trainable parameters: ``regularized`` (ndim > 1, not a bias) and ``not_regularized``.

    Each group dict carries ``apply_wd`` so the weight-decay schedule writes 0 to the second group, and
    ``lars_exclude`` so LARS leaves it alone (DINO ``get_params_groups``).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "apply_wd": True, "lars_exclude": False, "name": "regularized"},
        {"params": no_decay, "apply_wd": False, "lars_exclude": True, "name": "not_regularized", "weight_decay": 0.0},
    ]
