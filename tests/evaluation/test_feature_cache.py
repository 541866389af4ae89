"""Feature cache: hit on identical inputs, miss when the checkpoint, the data or the settings change, atomic files,
corrupt files recomputed, and the same values whether the features come fresh or from the cache."""

import os
import time

import torch

from evaluation.feature_cache import FeatureCache, file_fingerprint

CPU = torch.device("cpu")


class Counter:
    def __init__(self, seed=0):
        self.calls, self.seed = 0, seed

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.seed + self.calls)
        return {"x": torch.randn(5, 3, generator=g), "y": torch.arange(5)}


def _setup(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights-v1" * 1000)
    data = tmp_path / "data" / "cls"
    data.mkdir(parents=True)
    (data / "a.jpg").write_bytes(b"img")
    return str(ckpt), str(tmp_path / "data")


def _cache(tmp_path, ckpt, dtype=torch.float32):
    return FeatureCache(str(tmp_path / "cache"), dtype, {"checkpoint": file_fingerprint(ckpt), "weights": "auto"})


def test_hit_then_invalidation(tmp_path):
    ckpt, data = _setup(tmp_path)
    fn = Counter()
    first = _cache(tmp_path, ckpt).get_or_compute("val", {"size": 32}, fn, CPU, data)
    second = _cache(tmp_path, ckpt).get_or_compute("val", {"size": 32}, fn, CPU, data)
    assert fn.calls == 1 and torch.equal(first["x"], second["x"]) and torch.equal(second["y"], torch.arange(5))
    _cache(tmp_path, ckpt).get_or_compute("val", {"size": 48}, fn, CPU, data)  # other transform
    assert fn.calls == 2
    (tmp_path / "data" / "cls" / "b.jpg").write_bytes(b"new image")  # data changed
    _cache(tmp_path, ckpt).get_or_compute("val", {"size": 32}, fn, CPU, data)
    assert fn.calls == 3
    time.sleep(0.01)
    with open(ckpt, "wb") as f:  # checkpoint re-saved (same size, new content)
        f.write(b"weights-v2" * 1000)
    _cache(tmp_path, ckpt).get_or_compute("val", {"size": 32}, fn, CPU, data)
    assert fn.calls == 4
    names = os.listdir(tmp_path / "cache")
    assert len(names) == 4 and all(n.endswith(".pt") and not n.startswith(".") for n in names)  # no temp files


def test_corrupt_file_is_recomputed(tmp_path):
    ckpt, data = _setup(tmp_path)
    cache, fn = _cache(tmp_path, ckpt), Counter()
    cache.get_or_compute("val", {}, fn, CPU, data)
    (path,) = [os.path.join(tmp_path / "cache", n) for n in os.listdir(tmp_path / "cache")]
    with open(path, "r+b") as f:
        f.truncate(40)
    again = _cache(tmp_path, ckpt).get_or_compute("val", {}, fn, CPU, data)
    assert fn.calls == 2 and again["x"].shape == (5, 3)
    assert _cache(tmp_path, ckpt).get_or_compute("val", {}, fn, CPU, data)["x"].shape == (5, 3) and fn.calls == 2


def test_fp16_cache_returns_the_same_values_fresh_and_cached(tmp_path):
    ckpt, data = _setup(tmp_path)
    fn = Counter()
    fresh = _cache(tmp_path, ckpt, torch.float16).get_or_compute("t", {}, fn, CPU, data)
    cached = _cache(tmp_path, ckpt, torch.float16).get_or_compute("t", {}, fn, CPU, data)
    assert fn.calls == 1 and fresh["x"].dtype == torch.float32 and torch.equal(fresh["x"], cached["x"])


def test_disabled_cache_always_computes(tmp_path):
    fn = Counter()
    cache = FeatureCache(None)
    cache.get_or_compute("v", {}, fn, CPU, "/does/not/matter")
    cache.get_or_compute("v", {}, fn, CPU, "/does/not/matter")
    assert fn.calls == 2
