"""Loader benchmark: ``python -m benchmarks.loader`` - torchvision baseline vs FFCV vs DALI on the same data.

Two recipes, measured side by side in one process: ``crop`` (decode + multi-crop + flip; the loaders deliver uint8
crops) and ``full`` (the DINO recipe: 2 x 224 + N x 96 with colour jitter, grayscale, blur, solarize, normalise). The
baseline is the official repos' way (ImageFolder + PIL ops per image in DataLoader workers); FFCV and DALI deliver
crops and ``DeviceAugment`` does the colour ops batched on the device; ``torchvision+devaug`` is the torchvision
loader with the same device augmentation.

Columns: images/s (one image = all its crops; median of the timed epochs), ratios to the baseline and to two JPEG
decode ceilings (full-image libjpeg-turbo decoding, one process per core, of the original and of the stored JPEGs),
time to the first batch, CPU ms per image (independent of other load, unlike img/s) and peak PSS with workers.

Data: ``D/train`` holds the original JPEGs, ``D/ffcv/train.beton`` and ``D/dali/train/`` come from the converter
(``--generate N`` first creates N ImageNet-like JPEGs). Unless ``--no-malloc-env`` it re-executes itself with glibc
malloc thresholds, ``THP_MEM_ALLOC_ENABLE=1`` and ``OMP_WAIT_POLICY=PASSIVE``, and every row runs with
``--torch-threads``; why, and the measured tables: ``docs/performance.md``::

    python -m benchmarks.loader --data-dir data/bench --generate 2000 --batch-size 64 --workers 2 --epochs 3 \
        --json runs/bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

from pipeline.config import AugmentConfig, DataConfig, dino_views

# THP_MEM_ALLOC_ENABLE: PyTorch's CPU allocator asks for transparent huge pages on large tensors (> 32 MiB tensors
# are always mmap'd fresh by glibc, so each batch's fp32 views were page-faulted 4 KiB at a time: DeviceAugment's
# fused compiled DINO batch 140 -> 86 ms CPU).
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning between parallel regions, so they do not
# steal the cores from the loaders' decode threads (FFCV full recipe, 2 torch threads: 8.8 -> 3.3 CPU ms/img).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296", "THP_MEM_ALLOC_ENABLE": "1",
              "OMP_WAIT_POLICY": "PASSIVE"}
RECIPES = ("crop", "full")
LOADERS = ("torchvision", "torchvision+devaug", "ffcv", "dali")


# ============ data: ImageNet-like JPEGs, conversion, decode ceiling ============


def render_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 photo-like texture: smooth colour field + mid-frequency blobs + stripes + sensor-like grain.

    JPEG q90 files come out around 80-100 KB at 430 px, close to ImageNet's average, so entropy decoding (the bulk
    of JPEG time) costs about what it costs on real photos; flat synthetic images would decode several times faster.
    """
    from PIL import Image

    img = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC),
                     dtype=np.float32)
    mid = (rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)) * 50 + 128).clip(0, 255).astype(np.uint8)
    img += np.asarray(Image.fromarray(mid).resize((w, h), Image.BILINEAR), dtype=np.float32) - 128
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy, phase = rng.uniform(0.02, 0.2), rng.uniform(0.02, 0.2), rng.uniform(0, 2 * np.pi)
    img += 30 * np.sin(xx * fx + yy * fy + phase)[..., None]
    img += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def _write_image(task: tuple[str, int, int]) -> None:
    from PIL import Image

    path, index, size = task
    rng = np.random.default_rng(index)
    h, w = (int(x) for x in rng.integers(int(size * 0.88), int(size * 1.12) + 1, 2))
    Image.fromarray(render_texture(rng, h, w)).save(path, quality=90)


def ensure_bench_data(root: str, generate: int, size: int, max_side: int, workers: int) -> dict[str, str]:
    """Generate (if asked and missing) ``root/train`` and convert it to ``root/ffcv`` and ``root/dali``."""
    folder = os.path.join(root, "train")
    if generate > 0:
        tasks = [(os.path.join(folder, f"class{i % 10:02d}", f"img{i:06d}.jpg"), i, size) for i in range(generate)]
        for d in {os.path.dirname(t[0]) for t in tasks}:
            os.makedirs(d, exist_ok=True)
        todo = [t for t in tasks if not os.path.exists(t[0])]
        if todo:
            print(f"[bench] generating {len(todo)} JPEGs in {folder}", flush=True)
            with multiprocessing.Pool(max(1, workers)) as pool:
                pool.map(_write_image, todo, chunksize=16)
    if not os.path.isdir(folder):
        raise SystemExit(f"--data-dir: {folder} does not exist (pass --generate N to create a dataset)")
    from pipeline.convert.build import convert

    convert(folder, root, "both", max_side=max_side, jpeg_quality=90, workers=max(1, workers), progress=False,
            log=lambda msg: print(f"[bench] {msg}", flush=True))
    return {"folder": folder, "ffcv": os.path.join(root, "ffcv", "train.beton"),
            "dali": os.path.join(root, "dali", "train")}


def sample_jpegs(paths: dict[str, str], limit: int = 2048) -> tuple[list[bytes], list[bytes], int]:
    """Up to ``limit`` (original, stored) JPEGs for the decode ceilings, and the dataset size."""
    from pipeline.load.dali_loader import ShardIndex

    index = ShardIndex(paths["dali"])
    stored = [index.jpeg(i).tobytes() for i in range(min(limit, len(index)))]
    files = sorted(glob.glob(os.path.join(paths["folder"], "*", "*")))[:limit]
    original = []
    for f in files:
        with open(f, "rb") as fh:
            original.append(fh.read())
    return original, stored, len(index)


def _decode_worker(args: tuple[list[bytes], str, float]) -> tuple[int, float, int, float]:
    """Decode ``jpegs`` in a loop for ``seconds`` (at least one pass); returns (images, seconds, pixels, CPU s)."""
    jpegs, decoder, seconds = args
    if decoder == "opencv":
        import cv2

        cv2.setNumThreads(1)
        decode = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)  # noqa: E731
    else:
        from PIL import Image

        decode = lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))  # noqa: E731
    n, pixels, t0, c0 = 0, 0, time.perf_counter(), time.process_time()
    while n < len(jpegs) or time.perf_counter() - t0 < seconds:
        img = decode(jpegs[n % len(jpegs)])
        pixels += img.shape[0] * img.shape[1]
        n += 1
    return n, time.perf_counter() - t0, pixels, time.process_time() - c0


def decode_ceiling(jpegs: list[bytes], processes: int, seconds: float) -> dict:
    """Full-image JPEG decode rate of all cores (one process per core), best of OpenCV and Pillow."""
    best = None
    for decoder in ("opencv", "pillow"):
        shares = [(jpegs[p::processes], decoder, seconds) for p in range(processes)]
        with multiprocessing.Pool(processes) as pool:  # fork: runs before any loader thread exists
            parts = pool.map(_decode_worker, shares)
        rate = sum(n / t for n, t, _, _ in parts)
        images = sum(n for n, *_ in parts)
        side = (sum(p for _, _, p, _ in parts) / images) ** 0.5
        cpu_ms = 1000 * sum(c for *_, c in parts) / images
        if best is None or rate > best["img_s"]:
            best = {"decoder": decoder, "img_s": rate, "processes": processes, "mean_side": side,
                    "cpu_ms_per_img": cpu_ms}
    return best


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), of its live children (DataLoader workers) and of the
    children it has already reaped: a worker that exits between two readings keeps its time in the total, so the
    total never decreases."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for p in me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except (psutil.Error, OSError):
            pass
    return total


class PeakMemory:
    """Context manager sampling the PSS (RSS when PSS is unavailable) of this process + its children.

    Reading PSS (``/proc/*/smaps``) costs ~10 ms of CPU per sample; ``cpu_s`` is the CPU time the sampler thread
    used, so callers can subtract it from the process's CPU time.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_mib, self.cpu_s = interval, 0.0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while True:
            t0, total = time.thread_time(), 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    total += getattr(info, "pss", info.rss)
                except (psutil.Error, OSError):
                    pass
            self.peak_mib = max(self.peak_mib, total / 2**20)
            self.cpu_s += time.thread_time() - t0
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ============ the benchmark ============


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="D with D/train (ImageFolder); converted data goes to D/ffcv, "
                   "D/dali")
    p.add_argument("--generate", type=int, default=0, help="create N ImageNet-like JPEGs in D/train first (0 = no)")
    p.add_argument("--image-size", type=int, default=430, help="mean side of generated images (px)")
    p.add_argument("--max-side", type=int, default=256, help="pre-resize when converting (px); 256 = FFCV's "
                   "ImageNet setting (most 224 px global crops are then upscaled: the usual trade-off)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers/threads (use every core)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader and recipe")
    p.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs first (JIT, worker start-up)")
    p.add_argument("--n-local", type=int, default=6, help="local 96 px crops (DINO: 6-10)")
    p.add_argument("--sizes", default="224,96", help="global,local crop sides (smaller only for smoke tests)")
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"subset of {','.join(LOADERS)}")
    p.add_argument("--recipes", default=",".join(RECIPES), help="subset of crop,full")
    p.add_argument("--jitter", choices=("exact", "fused"), default="exact", help="DeviceAugment colour jitter impl")
    p.add_argument("--compile-augment", action="store_true", help="torch.compile DeviceAugment's elementwise stages "
                   "(compiled during the warm-up epoch)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads of the "
                   "main process, used by DeviceAugment (default: all cores)")
    p.add_argument("--ceiling-seconds", type=float, default=3.0, help="duration of the decode-ceiling measurement")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--no-malloc-env", action="store_true", help="keep glibc's default malloc thresholds")
    return p.parse_args(argv)


def data_config(args: argparse.Namespace, kind: str, path: str, recipe: str) -> DataConfig:
    """DataConfig of one table row; only the official ``torchvision`` full-recipe row augments in PIL."""
    g, s = (int(x) for x in args.sizes.split(","))
    views = [dataclasses.replace(v, size=g if v.role == "global" else s) for v in dino_views(n_local=args.n_local)]
    loader = "torchvision" if kind.startswith("torchvision") else kind
    return DataConfig(loader=loader, train_path=path, batch_size=args.batch_size, workers=args.workers,
                      views=views, device_augment=(recipe == "crop" or kind != "torchvision"),
                      augment=AugmentConfig(jitter_impl=args.jitter))


def build(kind: str, cfg: DataConfig):
    """The loader for a row of the table (all on the CPU, rank 0 of 1, seed 0)."""
    kw = dict(seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    if kind.startswith("torchvision"):
        from pipeline.load.torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(cfg, **kw)
    if kind == "ffcv":
        from pipeline.load.ffcv_loader import build_ffcv_loader

        return build_ffcv_loader(cfg, **kw)
    from pipeline.load.dali_loader import build_dali_loader

    return build_dali_loader(cfg, **kw)


def run_one(args: argparse.Namespace, kind: str, recipe: str, path: str) -> dict:
    """Time one loader on one recipe: warm-up epochs, then timed epochs; returns one result row."""
    from pipeline.augment.gpu_augment import DeviceAugment

    cfg = data_config(args, kind, path, recipe)
    augment = None
    if recipe == "full" and kind != "torchvision":
        augment = DeviceAugment(cfg.expanded_views(), cfg.mean, cfg.std, seed=0, flip=False,
                                compile=args.compile_augment, impl=cfg.augment)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        loader = build(kind, cfg)
        torch.set_num_threads(args.torch_threads)  # after FFCV's import/build, which set it to 1
        first_batch, epochs, cpu, timed = None, [], 0.0, 0
        for epoch in range(args.warmup_epochs + args.epochs):
            t_epoch, c_epoch, n = time.perf_counter(), cpu_seconds() - mem.cpu_s, 0
            for batch in loader.epoch_iter(epoch):
                if first_batch is None:
                    first_batch = time.perf_counter() - t0
                out = augment(batch) if augment is not None else batch
                n += out.batch_size
            if epoch >= args.warmup_epochs:
                epochs.append(n / (time.perf_counter() - t_epoch))
                cpu, timed = cpu + cpu_seconds() - mem.cpu_s - c_epoch, timed + n
        if hasattr(loader, "close"):
            loader.close()
        del loader
    return {"loader": kind, "recipe": recipe, "img_s": statistics.median(epochs), "img_s_epochs": epochs,
            "first_batch_s": first_batch, "peak_pss_mib": mem.peak_mib, "images_per_epoch": n,
            "cpu_ms_per_img": 1000 * cpu / timed}


def add_ratios(rows: list[dict], ceilings: dict) -> None:
    """Throughput ratios to the baseline and the two ceilings, and the stored-decode CPU-time ratio."""
    for r in rows:
        base = next((b for b in rows if b["recipe"] == r["recipe"] and b["loader"] == "torchvision"), None)
        r["vs_baseline"] = r["img_s"] / base["img_s"] if base else None
        r["vs_ceiling"] = r["img_s"] / ceilings["original"]["img_s"]
        r["vs_stored_ceiling"] = r["img_s"] / ceilings["stored"]["img_s"]
        r["cpu_vs_ceiling"] = ceilings["stored"]["cpu_ms_per_img"] / r["cpu_ms_per_img"]


def targets(rows: list[dict]) -> dict:
    """The loader targets (docs/performance.md), where the rows needed to check them exist."""
    get = {(r["loader"], r["recipe"]): r for r in rows}
    out = {}
    if ("ffcv", "full") in get and get[("ffcv", "full")]["vs_baseline"] is not None:
        out["ffcv_full_vs_baseline>=5"] = get[("ffcv", "full")]["vs_baseline"] >= 5.0
    if ("ffcv", "crop") in get:
        out["ffcv_crop_vs_ceiling>=0.5"] = get[("ffcv", "crop")]["vs_ceiling"] >= 0.5
    return out


def print_table(rows: list[dict], ceilings: dict, settings: dict) -> None:
    print(f"\nloader benchmark - {settings['images']} images, batch {settings['batch_size']}, "
          f"{settings['workers']} workers, {settings['cpus']} CPUs, views {settings['views']}, "
          f"malloc env {'on' if settings['malloc_env'] else 'off'}, jitter {settings['jitter']}"
          f"{' (compiled)' if settings['compile_augment'] else ''}, torch threads {settings['torch_threads']}")
    for name, c in ceilings.items():
        print(f"JPEG decode ceiling, {name} JPEGs (mean {c['mean_side']:.0f} px; {c['decoder']}, {c['processes']} "
              f"processes): {c['img_s']:,.0f} img/s, {c['cpu_ms_per_img']:.2f} CPU ms/img")
    print("(CPU ms/img and 'x ceil CPU' do not depend on other load on the machine; img/s does)\n")
    head = f"{'recipe':<6} {'loader':<20} {'img/s':>9} {'x baseline':>11} {'x ceiling':>10} {'x stored':>9} " \
           f"{'CPU ms/img':>11} {'x ceil CPU':>11} {'1st batch s':>12} {'peak MiB':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        vb = f"{r['vs_baseline']:.2f}" if r["vs_baseline"] is not None else "-"
        print(f"{r['recipe']:<6} {r['loader']:<20} {r['img_s']:>9,.0f} {vb:>11} {r['vs_ceiling']:>10.2f} "
              f"{r['vs_stored_ceiling']:>9.2f} {r['cpu_ms_per_img']:>11.2f} {r['cpu_vs_ceiling']:>11.2f} "
              f"{r['first_batch_s']:>12.1f} {r['peak_pss_mib']:>9,.0f}")
    for name, ok in targets(rows).items():
        print(f"target {name}: {'PASS' if ok else 'FAIL'}")


def maybe_reexec_with_malloc_env(args: argparse.Namespace, argv: list[str] | None) -> None:
    """glibc reads MALLOC_* at start-up only, so set them by re-executing this module once."""
    if args.no_malloc_env or all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()) or argv is not None:
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.loader", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    maybe_reexec_with_malloc_env(args, argv)
    bad = set(args.loaders.split(",")) - set(LOADERS) or set(args.recipes.split(",")) - set(RECIPES)
    if bad:
        raise SystemExit(f"--loaders/--recipes: unknown {sorted(bad)}")
    if args.torch_threads < 1:
        raise SystemExit(f"--torch-threads: must be >= 1, got {args.torch_threads}")
    paths = ensure_bench_data(args.data_dir, args.generate, args.image_size, args.max_side, args.workers)
    original, stored, n_images = sample_jpegs(paths)
    ceilings = {name: decode_ceiling(jpegs, os.cpu_count() or 1, args.ceiling_seconds)
                for name, jpegs in (("original", original), ("stored", stored))}
    rows = []
    for recipe in args.recipes.split(","):
        for kind in args.loaders.split(","):
            if kind == "torchvision+devaug" and recipe == "crop":
                continue  # identical to the torchvision crop row
            path = paths["ffcv"] if kind == "ffcv" else paths["dali"] if kind == "dali" else paths["folder"]
            print(f"[bench] {recipe:<4} {kind} ...", flush=True)
            rows.append(run_one(args, kind, recipe, path))
    add_ratios(rows, ceilings)
    g, s = (int(x) for x in args.sizes.split(","))
    settings = {"images": n_images, "batch_size": args.batch_size, "workers": args.workers,
                "cpus": os.cpu_count(), "views": f"2x{g} + {args.n_local}x{s}", "epochs": args.epochs,
                "warmup_epochs": args.warmup_epochs, "max_side": args.max_side, "jitter": args.jitter,
                "compile_augment": args.compile_augment,
                "malloc_env": all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()),
                "torch_threads": args.torch_threads}
    print_table(rows, ceilings, settings)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "decode_ceilings": ceilings, "results": rows, "targets": targets(rows)},
                      f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
