"""FFCV multi-crop loader: convert tiny ImageFolders to .beton, read them back through the loader, check the contract.

Datasets: "constant" images (one colour per image, so every crop of a sample must have that colour - the decode-once
check) and "gradient" images (R encodes x, G encodes y, so the crop box and flip can be read back from the pixels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv")

from pipeline.config import DataConfig, ViewConfig  # noqa: E402
from pipeline.load.ffcv_loader import build_ffcv_loader  # noqa: E402
from pipeline.load.order import shard_indices  # noqa: E402
from runtime.config_loader import ConfigError  # noqa: E402
from runtime.seeding import Stream, derive_seed  # noqa: E402

N_IMAGES = 24
CPU = torch.device("cpu")


def colour_of(i: int) -> np.ndarray:
    return np.array([(i * 37 + 20) % 256, (i * 91 + 50) % 256, (i * 13 + 90) % 256], dtype=np.uint8)


def write_constant_tree(root: Path) -> Path:
    """ImageFolder: image i has the constant colour_of(i), a non-square size and class c{i % 3} (label i % 3)."""
    for i in range(N_IMAGES):
        h, w = 48 + (i * 7) % 40, 64 + (i * 11) % 50
        path = root / f"c{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.broadcast_to(colour_of(i), (h, w, 3)).copy()).save(path)
    return root


def write_gradient_tree(root: Path, n: int = 16) -> Path:
    """ImageFolder of n identical 160 px images with R = x and G = y (scaled to 0..255), B = 128."""
    ramp = np.linspace(0, 255, 160).round().astype(np.uint8)
    img = np.empty((160, 160, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = ramp[None, :], ramp[:, None], 128
    (root / "c0").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(img).save(root / "c0" / f"img{i:03d}.png")
    return root


def source_ids(samples_tsv: str) -> np.ndarray:
    """Dataset index -> the i of the source file img{i}.png, from the converter's samples.tsv."""
    with open(samples_tsv) as f:
        rows = [line.rstrip("\n").split("\t") for line in f.readlines()[1:]]
    ids = np.empty(len(rows), dtype=np.int64)
    for index, _, path in rows:
        ids[int(index)] = int(Path(path).stem[3:])
    return ids


def convert_quiet(src: Path, out: Path, fmt: str) -> None:
    from pipeline.convert.build import convert

    convert(str(src), str(out), fmt, workers=1, progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv")
    convert_quiet(write_constant_tree(root / "constant"), root / "constant.beton", "ffcv")
    convert_quiet(write_gradient_tree(root / "gradient"), root / "gradient.beton", "ffcv")
    return {"constant": str(root / "constant.beton"), "gradient": str(root / "gradient.beton"),
            "ids": source_ids(str(root / "constant.samples.tsv"))}


def _cfg(path: str, views: list[ViewConfig], batch_size: int = 4, order: str = "random") -> DataConfig:
    return DataConfig(loader="ffcv", train_path=path, batch_size=batch_size, workers=2, views=views, order=order)


def _small_dino() -> list[ViewConfig]:
    return [ViewConfig("global", 2, 40, (0.25, 1.0)), ViewConfig("local", 6, 16, (0.05, 0.25))]


def _epoch(loader, epoch: int, start: int = 0) -> list:
    """Materialise an epoch (clone: batch tensors alias FFCV's ring buffer)."""
    return [(torch.stack([v.float() for v in b.views[:b.n_global]], 1).clone(), [v.clone() for v in b.views],
             b.labels.clone(), b.indices.clone()) for b in loader.epoch_iter(epoch, start)]


@pytest.fixture(scope="module")
def dino_loader(betons):
    return build_ffcv_loader(_cfg(betons["constant"], _small_dino()), seed=3, rank=0, world_size=1, device=CPU)


def test_batches_labels_shapes_and_decode_once(dino_loader, betons):
    assert len(dino_loader) == N_IMAGES // 4
    seen, n_batches, kept = [], 0, []
    for b in dino_loader.epoch_iter(0):  # streamed: views alias the loader's ring buffer
        n_batches += 1
        kept.append((b.indices, b.labels))  # kept without clone: labels and indices must be copies
        assert b.n_global == 2 and len(b.views) == 8
        assert [tuple(v.shape) for v in b.views] == [(4, 3, 40, 40)] * 2 + [(4, 3, 16, 16)] * 6
        assert all(v.dtype == torch.uint8 for v in b.views)
        src = betons["ids"][b.indices.numpy()]
        assert b.labels.tolist() == (src % 3).tolist()
        for k, i in enumerate(src.tolist()):
            want = torch.from_numpy(colour_of(i)).float()
            for v in b.views:  # every crop of the sample comes from the same decoded image
                pix = v[k].float().reshape(3, -1)
                assert (pix - want[:, None]).abs().max() <= 8, (i, pix.mean(1), want)
        seen += b.indices.tolist()
    assert n_batches == len(dino_loader)
    assert torch.cat([k[0] for k in kept]).tolist() == seen
    assert torch.cat([k[1] for k in kept]).tolist() == (betons["ids"][seen] % 3).tolist()
    assert sorted(seen) == list(range(N_IMAGES))  # one epoch = every sample once (24 = 6 full batches)


def test_deterministic_and_resumable(dino_loader, betons):
    first = _epoch(dino_loader, 0)
    other = build_ffcv_loader(_cfg(betons["constant"], _small_dino()), seed=3, rank=0, world_size=1, device=CPU)
    again = _epoch(other, 0)
    for (_, va, la, ia), (_, vb, lb, ib) in zip(first, again, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))
    resumed = _epoch(dino_loader, 0, start=2)
    assert [r[3].tolist() for r in resumed] == [f[3].tolist() for f in first[2:]]
    assert all(torch.equal(x, y) for r, f in zip(resumed, first[2:]) for x, y in zip(r[1], f[1]))
    next_epoch = _epoch(dino_loader, 1)
    assert [b[3].tolist() for b in next_epoch] != [b[3].tolist() for b in first]


def test_sharding_two_ranks(betons):
    cfg = _cfg(betons["constant"], _small_dino(), batch_size=5)
    ranks = [build_ffcv_loader(cfg, seed=1, rank=r, world_size=2, device=CPU) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == N_IMAGES // (5 * 2)
    seen = [torch.cat([b.indices.clone() for b in ld.epoch_iter(4)]).tolist() for ld in ranks]
    assert len(seen[0]) == len(seen[1]) == len(ranks[0]) * 5
    assert not set(seen[0]) & set(seen[1])
    assert seen == [shard_indices(N_IMAGES, 5, 1, 4, r, 2).tolist() for r in range(2)]


def _boxes_from_gradient(view: torch.Tensor):
    """Estimate crop width/height (source pixels) and flip from R (= x) and G (= y) of (B, 3, S, S) crops."""
    v = view.float() * (159 / 255)
    s = view.shape[-1]
    dx = (v[:, 0, :, -1] - v[:, 0, :, 0]).mean(1) * s / (s - 1)  # signed: negative when flipped
    dy = (v[:, 1, -1, :] - v[:, 1, 0, :]).mean(1) * s / (s - 1)
    return dx.abs(), dy, dx < 0


def test_crops_keep_aspect_ratio_jitter_and_flip(betons):
    views = [ViewConfig("global", 2, 48, (0.3, 1.0)), ViewConfig("local", 2, 32, (0.1, 0.3))]
    cfg = _cfg(betons["gradient"], views, batch_size=8)
    log_ratios, flips = [], []
    for flip in (True, False):
        loader = build_ffcv_loader(cfg, seed=0, rank=0, world_size=1, device=CPU, flip=flip)
        for epoch in range(3):
            for b in loader.epoch_iter(epoch):
                for v in b.views:
                    w, h, flipped = _boxes_from_gradient(v)
                    if flip:
                        log_ratios.append(torch.log(w / h))
                    flips.append((flip, flipped))
    lr = torch.cat(log_ratios)
    lo, hi = np.log(3 / 4), np.log(4 / 3)
    assert lr.min() > lo - 0.1 and lr.max() < hi + 0.1  # ratios stay in the configured range
    assert (lr.abs() > 0.12).float().mean() > 0.3, lr  # and are not all square (the FFCV-SSL fork bug)
    on = torch.cat([f for k, f in flips if k])
    off = torch.cat([f for k, f in flips if not k])
    assert 0.25 < on.float().mean() < 0.75 and not off.any()


def test_ressl_five_sizes(betons):
    views = [ViewConfig("global", 1, s, (0.2, 1.0)) for s in (224, 192)] + \
        [ViewConfig("local", 1, s, (0.05, 0.3)) for s in (160, 128, 96)]
    loader = build_ffcv_loader(_cfg(betons["constant"], views, batch_size=6), seed=0, rank=0, world_size=1,
                               device=CPU)
    b = next(iter(loader.epoch_iter(0)))
    assert [tuple(v.shape) for v in b.views] == [(6, 3, s, s) for s in (224, 192, 160, 128, 96)]
    assert b.n_global == 2
    loader.close()


def test_jit_off_matches_jit_on(betons, dino_loader):
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    try:
        loader = build_ffcv_loader(_cfg(betons["constant"], _small_dino()), seed=3, rank=0, world_size=1,
                                   device=CPU)
    finally:
        Compiler.set_enabled(True)
    off = _epoch(loader, 0, start=len(loader) - 2)
    on = _epoch(dino_loader, 0, start=len(loader) - 2)
    for (_, va, _, ia), (_, vb, _, ib) in zip(off, on, strict=True):
        assert torch.equal(ia, ib)
        assert all(torch.equal(x, y) for x, y in zip(va, vb))


def test_quasi_random_loader_shards_with_process_cache(betons):
    """quasi_random is meant for os_cache=False (FFCV's process cache loads only the pages an epoch needs)."""
    cfg = dataclasses.replace(_cfg(betons["constant"], _small_dino(), batch_size=3, order="quasi_random"),
                              os_cache=False)
    seen = [[], []]
    for r in range(2):
        for b in build_ffcv_loader(cfg, seed=0, rank=r, world_size=2, device=CPU).epoch_iter(0):
            seen[r] += b.indices.tolist()
            for k, i in enumerate(betons["ids"][b.indices.numpy()].tolist()):  # bytes read through the process cache
                want = torch.from_numpy(colour_of(i)).float()
                assert (b.views[-1][k].float().mean((1, 2)) - want).abs().max() <= 6
    assert len(seen[0]) == len(seen[1]) == 12 and sorted(seen[0] + seen[1]) == list(range(N_IMAGES))


def test_bad_inputs_raise_clear_errors(tmp_path, betons):
    with pytest.raises(ConfigError, match="does not exist"):
        build_ffcv_loader(_cfg(str(tmp_path / "missing.beton"), _small_dino()), seed=0, rank=0, world_size=1,
                          device=CPU)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton file" * 10)
    with pytest.raises(ConfigError, match="not a readable FFCV"):
        build_ffcv_loader(_cfg(str(junk), _small_dino()), seed=0, rank=0, world_size=1, device=CPU)
    with pytest.raises(ConfigError, match="batch_size"):
        build_ffcv_loader(_cfg(betons["constant"], _small_dino(), batch_size=64), seed=0, rank=0, world_size=1,
                          device=CPU)


def _ranked_indices(rank: int, world_size: int, tmpdir: str, path: str) -> list[int]:
    """One epoch of this rank's indices, built through pipeline.build_loader inside a gloo process group."""
    import torch.distributed as tdist

    from pipeline import build_loader

    cfg = _cfg(path, [ViewConfig("global", 1, 24, (0.5, 1.0))], batch_size=5)
    loader = build_loader(cfg, seed=4, rank=tdist.get_rank(), world_size=tdist.get_world_size(), device=CPU)
    mine = torch.cat([b.indices.clone() for b in loader.epoch_iter(2)])
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    tdist.all_gather(gathered, mine)  # equal lengths on every rank, or gloo would fail here
    return torch.stack(gathered).tolist()


@pytest.mark.dist
@pytest.mark.slow
def test_sharding_under_gloo(betons):
    from tests.dist_helpers import run_distributed

    results = run_distributed(_ranked_indices, 2, betons["constant"])
    assert results[0] == results[1]
    r0, r1 = results[0]
    assert len(r0) == len(r1) == 10 and not set(r0) & set(r1)
    assert [r0, r1] == [shard_indices(N_IMAGES, 5, 4, 2, r, 2).tolist() for r in range(2)]


def test_counter_rng_streams_are_uniform_and_independent():
    from pipeline.load.ffcv_decode import CounterRNG, view_key

    ekey = np.uint64(derive_seed(Stream.FFCV_CROPS, 0, 0, bits=64))
    rng = CounterRNG(np.uint64(view_key(ekey, np.uint64(5), np.uint64(0))))
    u = np.array([rng.random() for _ in range(20000)])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800  # expected 2000 per bin
    ints = np.array([rng.integers(3, 10) for _ in range(7000)])
    assert set(ints.tolist()) == set(range(3, 10)) and np.bincount(ints)[3:].min() > 850
    firsts = [CounterRNG(np.uint64(view_key(ekey, np.uint64(i), np.uint64(v)))).random()
              for i in range(50) for v in range(4)]
    assert len(set(firsts)) == 200  # every (sample, view) has its own stream


def test_resize_kernel_is_opencv_inter_area():
    """The docstrings promise INTER_AREA (antialiased when shrinking); check FFCV's C resize really is that."""
    import cv2

    from pipeline.load.ffcv_compat import resize_c

    img = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    for s in (40, 200):  # shrink and enlarge
        out = np.zeros((s, s, 3), np.uint8)
        resize_c(0, img.ctypes.data, 100, 120, 10, 90, 5, 105, out.ctypes.data, s, s)
        assert np.array_equal(out, cv2.resize(img[10:90, 5:105], (s, s), interpolation=cv2.INTER_AREA))


THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
torch.set_num_threads(2)
from pipeline.load.ffcv_loader import build_ffcv_loader
from pipeline.config import DataConfig, ViewConfig
cfg = DataConfig(loader="ffcv", train_path={path!r}, batch_size=4, workers=2, views=[ViewConfig("global", 2, 40)])
loader = build_ffcv_loader(cfg, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
after_build = torch.get_num_threads()
next(iter(loader.epoch_iter(0)))
print(after_build, torch.get_num_threads())
"""


def test_torch_keeps_its_threads_through_ffcv(betons):
    """A fresh process: importing ffcv and building/iterating its loader leave torch's intra-op threads alone (ffcv's
    compiler set them to 1 at import, and training ran single-threaded)."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", THREADS_SCRIPT.format(repo=repo, path=betons["constant"])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["2", "2"], out.stdout
