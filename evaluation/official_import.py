"""``eval.py import``: an official repository's released checkpoint -> a flashssl checkpoint or a timm .safetensors.

The layout is detected from the file (:data:`LAYOUTS`, first match wins): which container and key prefix hold the
backbone each method *evaluates* (its spec's evaluation section), and where the other network of the pair lives.

=============  ===================================  ==================================  ===========================
layout         evaluated backbone                   other network                       upstream evaluation loads
=============  ===================================  ==================================  ===========================
resa           [state_dict.]module.momentum_encoder  module.encoder (online)           momentum encoder
ressl          [state_dict|model.][module.]encoder_q.net  encoder_k.net (EMA teacher)   encoder_q.net (student)
dino-scfs      teacher.[module.]backbone[.model]    student.[module.]backbone           --checkpoint_key teacher
mvmr           state_dict.encoder.backbone          -                                   the single encoder
intl           [state_dict.]module.backbone         -                                   online backbone
cw_rgp         [state_dict.]module.model            -                                   the shared encoder
backbone       a bare torchvision ResNet state dict (ReSA ``*_only_*``, INTL/CW-RGP ``resnet50.pth``); needs --method
=============  ===================================  ==================================  ===========================

The backbone keys (torchvision names, ``fc.*`` dropped) are loaded strictly into ``timm.create_model(arch,
num_classes=0)`` (arch inferred from the keys), so every tensor is used and none is missing. A flashssl checkpoint
holds a freshly built method (the method's ImageNet recipe, ``configs/exp/<method>_in1k.yaml``) whose evaluated
backbone slot (``eval_weights``) gets the evaluated weights and whose other slot (if any) the other network, or the
evaluated weights again when the file has no other network. Projection heads are *not* imported (random init): the
file serves kNN / linear / fine-tuning, not resuming pre-training.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from evaluation.foreign_checkpoint import describe, load_foreign, state_dicts
from evaluation.resnet_keys import infer_resnet_arch
from runtime.checkpoint import CheckpointError


@dataclass(frozen=True)
class Layout:
    """Where one repository's checkpoint keeps its networks: (container, key prefix) candidates, in order."""

    name: str
    methods: tuple[str, ...]  # flashssl methods this layout can be (more than one: --method decides; none: any)
    evaluated: tuple[tuple[str, str], ...]
    other: tuple[tuple[str, str], ...] = ()
    upstream: str = ""


def _in(containers: tuple[str, ...], *prefixes: str) -> tuple[tuple[str, str], ...]:
    return tuple((c, p) for c in containers for p in prefixes)


_SD = ("state_dict", "model", "")
LAYOUTS: tuple[Layout, ...] = (
    Layout("resa", ("resa",), _in(_SD, "module.momentum_encoder."), _in(_SD, "module.encoder."),
           "winci-ai/resa src/utils.py load_pretrained_encoder: module.momentum_encoder.*"),
    Layout("ressl", ("ressl",), _in(_SD, "module.encoder_q.net.", "encoder_q.net."),
           _in(_SD, "module.encoder_k.net.", "encoder_k.net."), "ReSSL linear_eval.py: encoder_q.net (student)"),
    Layout("dino-scfs", ("dino", "scfs"), _in(("teacher",), "module.backbone.", "backbone."),
           _in(("student",), "module.backbone.", "backbone."), "DINO/SCFS eval: --checkpoint_key teacher"),
    Layout("mvmr", ("mvmr",), _in(("state_dict",), "encoder.backbone."), (),
           "vkinakh/mv-mr: SelfSupervisedModule.encoder.backbone (Lightning state_dict)"),
    Layout("intl", ("intl",), _in(_SD, "module.backbone."), (), "winci-ai/INTL evaluate.py: module.backbone.*"),
    Layout("cw_rgp", ("cw_rgp",), _in(_SD, "module.model."), (), "winci-ai/CW-RGP ImageNet/lincls.py: module.model.*"),
    Layout("backbone", (), _in(_SD, ""), (), "a bare torchvision ResNet state dict"),
)


@dataclass
class Imported:
    """The result of reading an official checkpoint: timm-named backbone state dicts and where they came from."""

    layout: Layout
    evaluated: dict[str, torch.Tensor]
    other: dict[str, torch.Tensor] | None
    source: str  # 'container:prefix' of the evaluated weights
    other_source: str | None
    dropped: list[str]  # keys under the prefix that are not backbone weights (the classifier fc.*)


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys under ``prefix`` without it (and without the ``model.`` torchextractor adds in SCFS); ``fc.*`` dropped."""
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if sub and all(k.startswith("model.") for k in sub):
        sub = {k[len("model."):]: v for k, v in sub.items()}
    dropped = sorted(k for k in sub if k.startswith("fc."))
    return {k: v for k, v in sub.items() if not k.startswith("fc.")}, dropped


def _first(found: dict[str, dict], candidates) -> tuple[dict[str, torch.Tensor], list[str], str] | None:
    for container, prefix in candidates:
        sd = found.get(container)
        if sd is None:
            continue
        sub, dropped = _strip(sd, prefix)
        if "conv1.weight" in sub and (prefix or "layer1.0.conv1.weight" in sub):
            return sub, dropped, f"{container or '<top level>'}:{prefix or '<no prefix>'}"
    return None


def read_official(path: str) -> Imported:
    """Detect the layout of ``path`` and extract its backbone(s); CheckpointError naming what was found."""
    obj = load_foreign(path)
    found = state_dicts(obj)
    for layout in LAYOUTS:
        hit = _first(found, layout.evaluated)
        if hit is None:
            continue
        other = _first(found, layout.other)
        evaluated, dropped, source = hit
        return Imported(layout, evaluated, other[0] if other else None, source, other[2] if other else None, dropped)
    known = "; ".join(f"{lay.name}: {', '.join(sorted({(c + ':' if c else '') + p for c, p in lay.evaluated}))}"
                      for lay in LAYOUTS[:-1])
    raise CheckpointError(f"{path}: unknown checkpoint layout ({describe(obj)}). Known layouts (container:prefix "
                          f"of the evaluated ResNet): {known}; or a bare torchvision ResNet state dict. Only ResNet "
                          "backbones are read (a ViT checkpoint is not)")


def timm_backbone(sd: dict[str, torch.Tensor], arch: str | None, what: str) -> nn.Module:
    """``timm.create_model(arch, num_classes=0)`` with ``sd`` loaded strictly (every tensor used, none missing)."""
    import timm

    arch = arch or infer_resnet_arch(sd, what)
    if not timm.is_model(arch):
        raise CheckpointError(f"--arch: unknown timm model {arch!r}")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: tensors do not fit timm {arch}: {str(e).splitlines()[1:3]}") from None
    if missing or unexpected:
        raise CheckpointError(f"{what}: does not match timm {arch} (missing {sorted(missing)[:4]}, unexpected "
                              f"{sorted(unexpected)[:4]})")
    return model.eval()


def resolve_method(imp: Imported, method: str | None, path: str) -> str:
    """The flashssl method: ``--method`` if given (checked against the layout), else the layout's only method."""
    allowed = imp.layout.methods
    if method:
        if allowed and method not in allowed:
            raise CheckpointError(f"{path}: --method {method} but the file has the {imp.layout.name} layout "
                                  f"({' or '.join(allowed)})")
        return method
    if len(allowed) != 1:
        hint = " or ".join(allowed) if allowed else "the method that trained it"
        raise CheckpointError(f"{path}: the {imp.layout.name} layout does not say which method made it; pass "
                              f"--method ({hint})")
    return allowed[0]


def build_flashssl_checkpoint(imp: Imported, backbone: nn.Module, method_name: str, path: str,
                              overrides: list[str]) -> dict[str, Any]:
    """A checkpoint dict in the trainer's format (model, config, step, meta) with the imported backbone(s)."""
    from engine.config import CONFIG_DIR, config_to_dict, load_config
    from methods import build_method

    recipe = os.path.join(CONFIG_DIR, "exp", f"{method_name}_in1k.yaml")
    arch = backbone.default_cfg.get("architecture") or type(backbone).__name__
    cfg = load_config(method_name, [recipe] if os.path.isfile(recipe) else [],
                      [f"model.backbone={arch}", *overrides])
    method = build_method(cfg)
    slots = {"student": method.student.backbone}
    if getattr(method, "teacher", None) is not None:
        slots["teacher"] = method.teacher.backbone
    first = method.eval_weights
    for slot, module in slots.items():
        sd = imp.evaluated if slot == first or imp.other is None else imp.other
        module.load_state_dict(sd, strict=True)
    filled = {s: ("evaluated" if s == first or imp.other is None else "other") for s in slots}
    meta = {"method": method_name, "backbone": arch, "format": 1,
            "imported": {"source": os.path.abspath(path), "layout": imp.layout.name, "evaluated": imp.source,
                         "other": imp.other_source, "slots": filled, "heads": "random init (not imported)"}}
    return {"model": method.state_dict(), "config": config_to_dict(cfg), "step": 0, "meta": meta}


@torch.no_grad()
def features_of(model: nn.Module, size: int = 64, n: int = 2) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model.eval()(x)


def import_checkpoint(path: str, out: str, method: str | None = None, arch: str | None = None,
                      overrides: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Read ``path``, write ``out`` (``.safetensors``: timm file; a ``.pt`` file or a directory: flashssl
    checkpoint), reload what was written and compare features. Returns the summary (also written as JSON)."""
    from evaluation.export import load_exported, save_backbone_file
    from evaluation.load import load_backbone
    from runtime.checkpoint import atomic_save, checkpoint_path

    t0 = time.perf_counter()
    timm_out = out.endswith(".safetensors")
    target = out if timm_out or out.endswith(".pt") else checkpoint_path(out, 0)
    if os.path.exists(target) and not force:
        raise CheckpointError(f"--out: {target} exists; pass --force to overwrite it")
    imp = read_official(path)
    backbone = timm_backbone(imp.evaluated, arch, f"{path} [{imp.source}]")
    if imp.other is not None:
        timm_backbone(imp.other, arch, f"{path} [{imp.other_source}]")  # same architecture, complete
    name = backbone.default_cfg.get("architecture") or arch
    summary: dict[str, Any] = {"source": os.path.abspath(path), "layout": imp.layout.name, "upstream":
                               imp.layout.upstream, "evaluated": imp.source, "other": imp.other_source,
                               "architecture": name, "tensors": len(imp.evaluated), "dropped": imp.dropped,
                               "out": os.path.abspath(target)}
    if timm_out:
        save_backbone_file(backbone, target, {"architecture": name, "method": method or imp.layout.name,
                                              "weights": imp.source, "source": os.path.abspath(path),
                                              "format": "timm state_dict, num_classes=0"})
        reloaded = load_exported(target)
    else:
        method_name = resolve_method(imp, method, path)
        atomic_save(build_flashssl_checkpoint(imp, backbone, method_name, path, list(overrides or [])), target)
        reloaded, _ = load_backbone(target, "auto")
        summary["method"] = method_name
    summary["max_abs_diff"] = float((features_of(reloaded) - features_of(backbone)).abs().max())
    if summary["max_abs_diff"] > 1e-5:
        raise CheckpointError(f"{target}: the written file gives different features (max |diff| "
                              f"{summary['max_abs_diff']:.3g})")
    summary["seconds"] = time.perf_counter() - t0
    with open(os.path.splitext(target)[0] + ".import.json", "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def add_import_parser(sub) -> None:
    p = sub.add_parser("import", help="an official repo's released checkpoint -> flashssl checkpoint or timm file")
    p.add_argument("--checkpoint", required=True, help="the official .pth/.ckpt file (ReSA, ReSSL, DINO, SCFS, "
                   "MV-MR, INTL, CW-RGP)")
    p.add_argument("--out", required=True, help="*.safetensors: timm backbone file; *.pt or a directory: flashssl "
                   "checkpoint (eval.py knn/linear take it)")
    p.add_argument("--method", default=None, help="flashssl method; needed when the layout does not tell "
                   "(DINO vs SCFS, a bare backbone file)")
    p.add_argument("--arch", default=None, help="timm name; default inferred from the ResNet keys")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("overrides", nargs="*", help="config key=value for the flashssl checkpoint, e.g. data.eval_size=96")


def run_import(args) -> dict[str, Any]:
    res = import_checkpoint(args.checkpoint, args.out, args.method, args.arch, args.overrides, args.force)
    print(f"{res['layout']} layout: evaluated backbone from {res['evaluated']}"
          + (f", other network from {res['other']}" if res["other"] else "")
          + f" -> {res['architecture']}, {res['tensors']} tensors (dropped: {res['dropped'] or 'none'})")
    print(f"wrote {res['out']} ({res.get('method', 'timm')}); reloaded features match (max |diff| "
          f"{res['max_abs_diff']:.1e}); {res['seconds']:.1f} s")
    return res
