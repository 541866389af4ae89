"""Evaluation of pretrained backbones: linear probe (standard or fast), weighted kNN, export to timm.

    torchrun --nproc_per_node=8 eval.py linear --checkpoint runs/x --data train.beton --val-data val.beton
    python eval.py linear --fast --checkpoint runs/dino_demo --data data/demo/train --val-data data/demo/val
    python eval.py knn --checkpoint runs/dino_demo --train-dir data/demo/train --val-dir data/demo/val
    python eval.py export --checkpoint runs/dino_demo --out backbone.safetensors
    python eval.py export --format detectron2 --checkpoint runs/dino_demo --out backbone_d2.pkl
    python eval.py voc07 --checkpoint runs/dino_demo --voc-dir VOCdevkit/VOC2007
    python eval.py import --checkpoint resa_resnet50_full_bs256_ep100.pth --out runs/resa_official
    python eval.py tsne --checkpoint runs/dino_demo --val-dir data/demo/val

``--checkpoint`` takes a checkpoint file or a run directory (its newest valid checkpoint is used). Data arguments take
an ImageFolder directory or an FFCV ``.beton`` file. Linear-probe hyperparameters: the method's official protocol
(``evaluation/config.py``), then ``--config`` YAML files, then trailing ``key=value`` overrides (``lr=0.1 epochs=10
fast.copies=2``). Bad input (checkpoint, paths, classes, keys) exits with code 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from runtime.cli_args import parse_args_with_overrides
from runtime.cli_types import positive_float, positive_int, ranged


def resolve_checkpoint(spec: str) -> str:
    from runtime.checkpoint import resolve_checkpoint as resolve  # shared with train.py --resume; imports torch

    return resolve(spec)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--weights", default="auto", choices=["auto", "student", "teacher"],
                   help="which backbone: auto = the method's official evaluation choice (DINO/SCFS/ReSA: teacher)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="feature cache directory (default <run dir>/feature_cache)")
    p.add_argument("--no-cache", action="store_true", help="always extract features; write no cache")


def add_knn_parser(sub) -> None:
    p = sub.add_parser("knn", help="weighted kNN on frozen features (ImageFolder dirs or .beton files)")
    _add_common(p)
    p.add_argument("--train-dir", "--data", dest="train_dir", required=True,
                   help="labelled feature bank: ImageFolder directory or .beton")
    p.add_argument("--val-dir", "--val-data", dest="val_dir", required=True,
                   help="labelled queries: ImageFolder directory or .beton")
    p.add_argument("--k", type=positive_int, nargs="+", default=[10, 20, 100],
                   help="neighbour counts (DINO reports k=20)")
    p.add_argument("--temperature", type=positive_float, default=0.07, help="vote weight exp(sim/T)")
    p.add_argument("--size", type=ranged(int, ge=8, also=(0,)), default=0,
                   help="center-crop side (resize = size*256/224); 0 = the checkpoint's data.eval_size")
    p.add_argument("--random-baseline", action="store_true", help="also evaluate a random-init backbone")
    p.add_argument("--report", default=None, help="run directory: print the demo results table with its images/s")
    p.add_argument("--out", default=None, help="write the results JSON here")
    _add_cache(p)


def add_linear_parser(sub) -> None:
    p = sub.add_parser("linear", help="linear probe on the frozen backbone (standard protocol, or --fast)")
    _add_common(p)
    p.add_argument("--data", required=True, help="labelled training split: ImageFolder directory or .beton")
    p.add_argument("--val-data", required=True, help="labelled validation split: ImageFolder directory or .beton")
    p.add_argument("--fast", action="store_true",
                   help="extract features once (cached), train the classifier on them: minutes instead of hours")
    p.add_argument("--config", action="append", default=[], help="probe YAML (keys of evaluation.config.LinearConfig)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="fail unless the data has this many classes")
    p.add_argument("--out", default=None, help="results JSON (default <run dir>/linear_eval[_fast].json)")
    p.add_argument("--no-resume", action="store_true", help="standard probe: ignore a saved per-epoch state")
    _add_cache(p)
    p.add_argument("overrides", nargs="*", help="key=value probe overrides, e.g. lr=0.1 epochs=10 fast.copies=2")


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="backbone weights as .safetensors loadable by timm.create_model(pretrained=True)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--weights", default="auto", choices=["auto", "student", "teacher"])
    p.add_argument("--out", required=True, help="output file: .safetensors (timm) or .pkl (detectron2)")
    p.add_argument("--format", default="timm", choices=["timm", "detectron2"],
                   help="timm: .safetensors for timm.create_model; detectron2: ResNet .pkl (MoCo's detection transfer)")
    p.add_argument("--no-verify", action="store_true", help="skip reloading with timm and comparing features")


def add_tsne_parser(sub) -> None:
    p = sub.add_parser("tsne", help="t-SNE map of frozen val features coloured by class, as PNG")
    _add_common(p)
    p.add_argument("--val-dir", "--val-data", dest="val_dir", required=True,
                   help="labelled split to map: ImageFolder directory or .beton")
    p.add_argument("--out", default=None, help="PNG path (default <run dir>/tsne.png; results JSON next to it)")
    p.add_argument("--max-images", type=int, default=0, help="class-proportional seeded subset; 0 = all images")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped below N/3)")
    p.add_argument("--seed", type=int, default=0)
    _add_cache(p)


def _device(choice: str):
    from engine.setup import pick_device
    from runtime import dist

    device = pick_device(choice)
    dist.init_from_env(device.type)
    return device


def _precision(choice: str, cfg, device) -> str:
    """'auto': the checkpoint's training precision on CUDA, fp32 on the CPU (no autocast speed-up there)."""
    from engine.setup import resolve_precision

    if choice != "auto":
        return choice
    return resolve_precision(cfg.model.precision, device) if device.type == "cuda" else "fp32"


def _cache(args, ckpt: str, which: str, precision: str, dtype: str = "float32"):
    import torch

    from evaluation.feature_cache import FeatureCache, file_fingerprint

    if args.no_cache:
        return FeatureCache(None)
    directory = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "feature_cache")
    base = {"checkpoint": file_fingerprint(ckpt), "weights": which, "precision": precision}
    return FeatureCache(directory, getattr(torch, dtype), base)


def _write_json(res: dict, out: str | None) -> None:
    from runtime import dist

    if out and dist.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=2)


def run_knn(args) -> dict:
    from engine.setup import autocast_dtype
    from evaluation.knn_eval import knn_of_checkpoint
    from evaluation.load import load_backbone
    from evaluation.report import print_knn_table

    path = resolve_checkpoint(args.checkpoint)
    device = _device(args.device)
    backbone, cfg = load_backbone(path, args.weights)
    if args.size:
        cfg.data.eval_size = args.size
    precision = _precision("auto", cfg, device)
    res = knn_of_checkpoint(path, args.train_dir, args.val_dir, device, args.weights, tuple(args.k),
                            args.temperature, args.random_baseline, cache=_cache(args, path, args.weights, precision),
                            autocast_dtype=autocast_dtype(precision, device), loaded=(backbone, cfg))
    res["checkpoint"] = path
    res["method"], res["backbone"] = cfg.method, cfg.model.backbone
    _write_json(res, args.out or (os.path.join(args.report, "knn_eval.json") if args.report else None))
    print_knn_table(res, args.report)
    return res


def run_linear(args) -> dict:
    from engine.setup import autocast_dtype
    from evaluation.config import load_linear_config
    from evaluation.eval_loaders import build_eval_split, build_probe_train_loader, check_same_classes
    from evaluation.knn_backbone import frozen_for
    from evaluation.load import load_backbone
    from evaluation.report import print_linear_summary
    from runtime import dist
    from runtime.config_loader import ConfigError

    t0 = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    backbone, cfg = load_backbone(path, args.weights)
    pcfg = load_linear_config(cfg.method, args.config, args.overrides)
    device = _device(args.device)
    size, resize = pcfg.crop_sizes(cfg.data.eval_size)
    workers = pcfg.workers if pcfg.workers >= 0 else cfg.data.workers
    train = build_eval_split(args.data, size, resize, workers, "--data")
    val = build_eval_split(args.val_data, size, resize, workers, "--val-data")
    num_classes = check_same_classes(train, val, args.num_classes)
    precision = _precision(pcfg.precision, cfg, device)
    frozen = frozen_for(backbone, cfg, device, autocast_dtype(precision, device))
    world = dist.world_size()

    def train_loader(per_rank_batch: int):
        return build_probe_train_loader(args.data, size=size, scale=pcfg.train_scale, interpolation=pcfg.interpolation,
                                        batch_size=per_rank_batch, workers=workers, seed=pcfg.seed, rank=dist.rank(),
                                        world_size=world, mean=cfg.data.mean, std=cfg.data.std)

    kind = "linear_fast_eval" if args.fast else "linear_eval"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), f"{kind}.json")
    if args.fast:
        from evaluation.fast_probe import fast_linear_probe

        cache = _cache(args, path, args.weights, precision, pcfg.fast.cache_dtype)
        aug_batch = max(1, min(cfg.eval.batch_size, train.n // world))  # full batches only: keep the remainder small
        res = fast_linear_probe(frozen, train, val, lambda: train_loader(aug_batch), num_classes, pcfg, cache,
                                cfg.eval.batch_size)
    else:
        from evaluation.feature_cache import cache_key, data_fingerprint, file_fingerprint
        from evaluation.linear import train_linear_probe
        from runtime.config_loader import to_dict

        if pcfg.batch_size % world:
            raise ConfigError(f"batch_size: {pcfg.batch_size} is not divisible by the {world} ranks")
        key = cache_key({"checkpoint": file_fingerprint(path), "weights": args.weights, "world": world,
                         "data": data_fingerprint(args.data), "val": data_fingerprint(args.val_data),
                         "config": to_dict(pcfg), "precision": precision})
        state = None if args.no_resume else os.path.splitext(out)[0] + ".state.pt"
        res = train_linear_probe(frozen, train_loader(pcfg.batch_size // world), val, num_classes, pcfg,
                                 eval_batch_size=cfg.eval.batch_size, state_path=state, resume_key=key)
    res.update(kind=kind, checkpoint=path, method=cfg.method, backbone=cfg.model.backbone, weights=args.weights,
               data=args.data, val_data=args.val_data, num_classes=num_classes, feature_dim=frozen.feature_dim,
               train_images=train.n, val_images=val.n, crop=[size, resize], precision=precision, world_size=world,
               seconds=time.perf_counter() - t0)
    _write_json(res, out)
    print_linear_summary(res, out)
    return res


def run_export(args) -> dict:
    from evaluation.export import export_backbone, usage, verify_export

    path = resolve_checkpoint(args.checkpoint)
    if args.format == "detectron2":
        from evaluation.detectron2_export import export_detectron2

        res = export_detectron2(path, args.out, args.weights)
        print(f"wrote {res['out']}: {res['tensors']} tensors in detectron2 names; config: {res['config_hint']}")
        return res
    meta = export_backbone(path, args.out, args.weights)
    print(f"wrote {args.out}\n{usage(meta, args.out)}")
    if not args.no_verify:
        diff = verify_export(path, args.out, args.weights)
        print(f"verified: timm-loaded features match the checkpoint's backbone (max |diff| {diff:.2e})")
        if diff > 1e-4:
            raise ValueError(f"{args.out}: reloaded backbone differs from the checkpoint (max |diff| {diff:.3g})")
    return meta


def _frozen_from_args(args):
    """(checkpoint path, its Config, device, precision, frozen backbone) for ``--checkpoint/--weights/--device``."""
    from engine.setup import autocast_dtype
    from evaluation.knn_backbone import frozen_for
    from evaluation.load import load_backbone

    path = resolve_checkpoint(args.checkpoint)
    device = _device(args.device)
    backbone, cfg = load_backbone(path, args.weights)
    precision = _precision("auto", cfg, device)
    return path, cfg, device, precision, frozen_for(backbone, cfg, device, autocast_dtype(precision, device))


def run_voc07(args) -> dict:
    from evaluation.voc07 import print_voc07, voc07_of_backbone

    path, cfg, device, precision, frozen = _frozen_from_args(args)
    res = voc07_of_backbone(frozen, args.voc_dir, args.size or cfg.data.eval_size, cfg.eval.batch_size,
                            cfg.data.workers, _cache(args, path, args.weights, precision), device, args.costs,
                            args.folds, args.seed, (args.train_split, args.test_split), args.jobs)
    res.update(kind="voc07_svm", checkpoint=path, method=cfg.method, backbone=cfg.model.backbone,
               weights=args.weights, voc_dir=args.voc_dir, precision=precision)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "voc07_eval.json")
    _write_json(res, out)
    print_voc07(res, out)
    return res


def run_tsne(args) -> dict:
    from evaluation.eval_loaders import build_eval_split
    from evaluation.tsne import tsne_of_split
    from runtime import dist

    path, cfg, device, precision, frozen = _frozen_from_args(args)
    size = cfg.data.eval_size
    split = build_eval_split(args.val_dir, size, round(size * 256 / 224), cfg.data.workers, "--val-dir")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "tsne.png")
    if not out.endswith(".png"):
        raise ValueError(f"--out: {out!r} must end in .png")
    replaced = os.path.exists(out)
    title = f"{cfg.method} {cfg.model.backbone}, {os.path.basename(path)}: t-SNE of {args.val_dir}"
    res = tsne_of_split(frozen, split, cfg.eval.batch_size, _cache(args, path, args.weights, precision), out,
                        max_images=args.max_images, perplexity=args.perplexity, seed=args.seed, title=title)
    res.update(checkpoint=path, method=cfg.method, backbone=cfg.model.backbone, weights=args.weights,
               val_data=args.val_dir)
    if dist.is_main():
        _write_json(res, os.path.splitext(out)[0] + ".json")
        print(f"{'replaced' if replaced else 'wrote'} {out}: {res['images']} images, {res['classes']} classes, "
              f"trustworthiness(k={res['trustworthiness_k']}) {res['trustworthiness']:.3f}; "
              f"features {res['feature_seconds']:.1f} s, t-SNE {res['tsne_seconds']:.1f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    from evaluation.official_import import add_import_parser, run_import
    from evaluation.semi import add_semi_parser, run_semi
    from evaluation.voc07 import add_voc07_parser

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_knn_parser(sub)
    add_linear_parser(sub)
    add_export_parser(sub)
    add_import_parser(sub)
    add_voc07_parser(sub, _add_common, _add_cache)
    add_semi_parser(sub)
    add_tsne_parser(sub)
    args = parse_args_with_overrides(parser, argv)
    from runtime import dist
    from runtime.checkpoint import CheckpointError
    from runtime.config_loader import ConfigError

    try:
        {"knn": run_knn, "linear": run_linear, "export": run_export, "import": run_import,
         "voc07": run_voc07, "semi": run_semi,
         "tsne": run_tsne}[args.command](args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
