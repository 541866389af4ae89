"""Typed configuration tree.

Merge order (fixed): dataclass defaults <- ``configs/method/<method>.yaml`` <- each ``--config`` YAML in order
<- CLI ``key=value`` overrides. The method-specific ``ssl`` section is typed by the selected method's own
``Config`` dataclass (see ``methods/``). Field comments say *why* and give recommended values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from models.config import ModelConfig
from optim.config import OptimConfig
from pipeline.config import DataConfig
from runtime.config_loader import (
    ConfigError,
    bounded,
    coerce,
    deep_merge,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class TrainConfig:
    epochs: int = bounded(100, ge=1)
    steps_per_epoch: int = bounded(0, ge=0)  # 0 = one pass over the data; >0 caps an epoch (demo, smoke tests)
    out_dir: str = "runs/default"
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = bounded(10, ge=1)  # steps between host syncs for loss logging (each .item() is a sync)
    ckpt_every: int = bounded(200, ge=1)  # steps between checkpoints (and always at the end of an epoch)
    keep_last: int = bounded(3, ge=1)  # checkpoints kept on disk
    resume: str = ""  # '' = fresh run, 'auto' = newest valid checkpoint in out_dir, or a path
    knn_at_end: bool = True  # run weighted kNN on data.val_path after training
    tensorboard: bool = True
    # linear classifier on detached backbone features, trained alongside SSL (engine/online_probe.py)
    online_probe: bool = False
    online_probe_lr: float = bounded(1e-3, gt=0)  # Adam; MV-MR's OnlineFineTuner uses 1e-4
    # Collapse guard (engine/collapse.py), checked at log steps: a criterion that holds for collapse_patience
    # consecutive log steps prints one warning naming the collapse and its usual fixes and writes an event row to
    # metrics.jsonl. stop_on_collapse=true then stops the run (train.py exits with code 2), and while a criterion is
    # holding no checkpoint is written, so the newest one on disk predates the collapse. A threshold of 0 switches
    # its criterion off. Teacher entropies are fractions of log K (teacher-student methods only).
    collapse_patience: int = bounded(3, ge=1)  # log steps
    stop_on_collapse: bool = False
    collapse_uniform_entropy: float = bounded(0.97, ge=0, le=1)  # uniform: mean per-sample teacher entropy >= this
    collapse_onehot_entropy: float = bounded(0.05, ge=0, lt=1)  # one-hot: entropy of the batch-mean output <= this
    collapse_min_rank: float = bounded(2.5, ge=0)  # dimensional collapse: effective rank of the batch features <= this
    collapse_min_std_ratio: float = bounded(0.02, ge=0, lt=1)  # constant output: per-dim std of unit features x sqrt(D)
    # information loss: kNN of the evaluated backbone this many points below its initialisation's (needs knn_every)
    collapse_knn_drop: float = bounded(2.0, ge=0)
    # epochs between kNN evaluations on eval.train_dir / eval.val_dir during training, logged as knn_top1 and
    # knn_gain (points over the same backbone at initialisation, measured before the first step); 0 = off
    knn_every: int = bounded(0, ge=0)


@dataclass
class EvalConfig:
    # labelled ImageFolder splits for kNN (at the end of training and in eval.py knn)
    train_dir: str = "data/demo/train"
    val_dir: str = "data/demo/val"
    knn_k: int = bounded(20, ge=1)
    knn_t: float = bounded(0.07, gt=0)
    batch_size: int = bounded(128, ge=1)
    features: Literal["teacher", "student", "auto"] = "auto"  # auto = the method's official choice


@dataclass
class CheckConfig:
    """The CI learning check of a recipe (``tests/methods/test_learning.py``, ``python -m benchmarks.learning``):
    a short run of this recipe on the real-image digits set must stay finite, keep the collapse guard silent and
    beat the random-init backbone's kNN@20 by ``min_knn_gain`` points (about half the gain measured with exactly
    these settings), unless ``known_gap`` says why it does not yet. Training ignores this section."""

    epochs: int = bounded(0, ge=0)  # 0 = the recipe has no learning check
    batch_size: int = bounded(0, ge=0)  # 0 = data.batch_size
    min_knn_gain: float = bounded(0.0, ge=0)  # kNN@20 top-1 points over the random init
    # Non-empty: the recipe is known not to beat the random init within the check's budget, and why (measured,
    # docs/small_data.md). The check then asserts only a finite run, and reports the gap as an expected failure.
    known_gap: str = ""


@dataclass
class Config:
    method: str = "dino"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    ssl: Any = None  # the selected method's Config dataclass instance


def load_config(method: str, config_files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the full config for ``method``; raises ConfigError before any work starts."""
    layers = [load_yaml(path) for path in method_layer_files(method) + list(config_files or [])]
    return resolve_layers(method, layers + [parse_override(item) for item in overrides or []])


def method_layer_files(method: str) -> list[str]:
    """``configs/method/<method>.yaml`` when it exists: the layer every run of ``method`` starts from."""
    method_yaml = os.path.join(CONFIG_DIR, "method", f"{method}.yaml")
    return [method_yaml] if os.path.exists(method_yaml) else []


def resolve_layers(method: str, layers: list[dict]) -> Config:
    """Dataclass defaults <- each layer (plain nested dicts) in order -> the validated Config of ``method``."""
    from methods import METHODS  # local import: engine sits above methods, methods never import engine

    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; allowed values: {', '.join(sorted(METHODS))}")
    merged: dict = {"method": method}
    for layer in layers:
        merged = deep_merge(merged, layer)
    if merged.get("method", method) != method:
        raise ConfigError(f"method: the config says {merged['method']!r} but --method is {method!r}")
    _expand_view_preset(merged)
    ssl_raw = merged.pop("ssl", {}) or {}
    cfg = from_dict(Config, merged)
    cfg.ssl = coerce(METHODS[method].Config, ssl_raw, "ssl")
    METHODS[method].check_config(cfg)
    return cfg


def _expand_view_preset(merged: dict) -> None:
    """``data.views: <name>`` -> the view list of ``configs/views/<name>.yaml`` (shared multi-crop recipes)."""
    views = (merged.get("data") or {}).get("views")
    if not isinstance(views, str):
        return
    path = os.path.join(CONFIG_DIR, "views", f"{views}.yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "views")) if f.endswith(".yaml"))
        raise ConfigError(f"data.views: unknown view preset {views!r}; known presets: {', '.join(known)}")
    preset = load_yaml(path)
    if set(preset) != {"views"} or not isinstance(preset["views"], list):
        raise ConfigError(f"view preset {path} must hold exactly one key 'views' with a list of views")
    merged["data"]["views"] = preset["views"]


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, ...]]:
    out = []
    for k, v in d.items():
        path = (*prefix, k) if prefix else (k,)
        out += _leaves(v, path) if isinstance(v, dict) and v else [path]
    return out


def _without(d: dict, path: tuple[str, ...]) -> dict:
    if len(path) == 1:
        return {k: v for k, v in d.items() if k != path[0]}
    return {**d, path[0]: _without(d[path[0]], path[1:])}


def restated_keys(method: str, path: str, below: list[str] | None = None) -> list[str]:
    """Dotted keys of YAML ``path`` that change nothing: the config resolved without the key is the same.

    ``below`` are the files under ``path`` in the merge order (default: the method YAML, unless ``path`` is it).
    A layer should hold only what it changes, so that a dataclass default stays the one source of its value.
    """
    if below is None:
        below = [f for f in method_layer_files(method) if os.path.abspath(f) != os.path.abspath(path)]
    base = [load_yaml(f) for f in below]
    layer = load_yaml(path)
    full = to_dict(resolve_layers(method, base + [layer]))

    def same_without(key: tuple[str, ...]) -> bool:
        try:
            return to_dict(resolve_layers(method, base + [_without(layer, key)])) == full
        except ConfigError:  # the key is needed (e.g. another value depends on it)
            return False

    return [".".join(key) for key in _leaves(layer) if key != ("method",) and same_without(key)]


def config_to_dict(cfg: Config) -> dict:
    return to_dict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved by :func:`config_to_dict` (e.g. from a checkpoint)."""
    from methods import METHODS

    data = _upgrade_saved(dict(data))
    ssl_raw = data.pop("ssl", {}) or {}
    cfg = from_dict(Config, data)
    cfg.ssl = coerce(METHODS.get_or_raise(cfg.method).Config, ssl_raw, "ssl")
    return cfg


def _upgrade_saved(data: dict) -> dict:
    """A config saved by an older flashssl -> today's keys, so that its checkpoints stay loadable: the device
    augmentation switches ``jitter_impl`` / ``cpu_impl`` were once set per view and now live in ``data.augment``."""
    views = (data.get("data") or {}).get("views")
    if not isinstance(views, list) or not any(isinstance(v, dict) and ("jitter_impl" in v or "cpu_impl" in v)
                                              for v in views):
        return data
    section = dict(data["data"])
    augment = dict(section.get("augment") or {})
    section["views"] = []
    for view in views:
        view = dict(view)
        for key in ("jitter_impl", "cpu_impl"):
            if key in view:
                augment.setdefault(key, view.pop(key))  # the views of one run shared one value
        section["views"].append(view)
    section["augment"] = augment
    return {**data, "data": section}
