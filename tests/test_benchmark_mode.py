"""train.py --benchmark: structure and sanity of the table and JSON (not a timing test)."""

import json

import pytest

import train as train_cli
from engine.benchmark import verdict
from tests.conftest import TINY_OVERRIDES


@pytest.mark.slow
def test_benchmark_mode_writes_consistent_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = train_cli.main(["--method", "dino", "--benchmark", "--steps", "2", *TINY_OVERRIDES,
                         f"data.train_path={tiny_folder}/train", f"train.out_dir={out}"])
    assert rc == 0
    r = json.loads((out / "benchmark.json").read_text())
    for key in ("loader_img_s", "model_img_s", "end_to_end_img_s", "augment_img_s", "peak_memory_mb"):
        assert r[key] > 0, key
    assert 0 <= r["data_wait_fraction"] <= 1 and 0 < r["loss_fraction"] < 1
    assert r["end_to_end_vs_model"] == pytest.approx(r["end_to_end_img_s"] / r["model_img_s"])
    assert r["loader_img_s"] == pytest.approx(r["loader_batches_s"] * r["batch_per_rank"])
    assert r["verdict"].startswith("bottleneck: ")
    printed = capsys.readouterr().out
    for phase in ("loader only", "model step only", "end to end", "warm-up (excluded)", r["verdict"]):
        assert phase in printed


BASE = {"loader_img_s": 1000.0, "augment_img_s": 1000.0, "model_img_s": 100.0, "end_to_end_img_s": 95.0,
        "loss_fraction": 0.1, "comm_fraction": 0.0}


@pytest.mark.parametrize("change, word", [
    ({}, "model"),
    ({"loss_fraction": 0.5}, "loss"),
    ({"loader_img_s": 50.0, "end_to_end_img_s": 45.0}, "loader"),
    ({"augment_img_s": 40.0, "end_to_end_img_s": 35.0}, "augmentation"),
    ({"comm_fraction": 0.4}, "communication"),
])
def test_verdict_names_the_bottleneck(change, word):
    assert verdict({**BASE, **change}).startswith(f"bottleneck: {word}")


def test_fast_step_bench_runs_the_chosen_variants(tiny_folder, tmp_path, capsys):
    from benchmarks import fast_step as fast_step_bench

    out = tmp_path / "fast.json"
    rc = fast_step_bench.main(["--method", "dino", "--steps", "1", "--rounds", "2", "--json", str(out),
                               "--variant", "channels-last fp32", "--variant", "eager fp32", *TINY_OVERRIDES,
                               f"data.train_path={tiny_folder}/train", f"train.out_dir={tmp_path / 'run'}"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert list(r) == ["channels-last fp32", "eager fp32"]
    assert r["channels-last fp32"]["speedup"] == pytest.approx(1.0)  # ratios are to the first variant
    assert len(r["eager fp32"]["all_ms"]) == 2  # one time per round
    assert r["eager fp32"]["speedup"] == pytest.approx(r["channels-last fp32"]["ms_per_step"]
                                                       / r["eager fp32"]["ms_per_step"])
    assert "vs channels-last fp32" in capsys.readouterr().out
