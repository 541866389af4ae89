"""``python -m benchmarks.loader`` runs end to end on tiny data and reports a well-formed table and JSON (no timing)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ffcv")
pytest.importorskip("nvidia.dali")

from benchmarks import loader as bench  # noqa: E402


@pytest.mark.slow
def test_bench_runs_on_tiny_data(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--data-dir", str(tmp_path / "data"), "--generate", "12", "--image-size", "64",
                     "--max-side", "48", "--sizes", "32,16", "--n-local", "2", "--batch-size", "4", "--workers", "1",
                     "--epochs", "1", "--warmup-epochs", "0", "--ceiling-seconds", "0.05", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    expected = {("crop", k) for k in ("torchvision", "ffcv", "dali")} | \
        {("full", k) for k in ("torchvision", "torchvision+devaug", "ffcv", "dali")}
    assert {(r["recipe"], r["loader"]) for r in rows} == expected
    for r in rows:
        assert r["img_s"] > 0 and r["first_batch_s"] > 0 and r["peak_pss_mib"] > 0, r
        assert r["images_per_epoch"] == 12  # 3 full batches of 4
        assert r["vs_ceiling"] == pytest.approx(r["img_s"] / report["decode_ceilings"]["original"]["img_s"])
        assert r["vs_stored_ceiling"] == pytest.approx(r["img_s"] / report["decode_ceilings"]["stored"]["img_s"])
        assert r["cpu_ms_per_img"] > 0 and r["cpu_vs_ceiling"] > 0
        base = next(b for b in rows if b["recipe"] == r["recipe"] and b["loader"] == "torchvision")
        assert r["vs_baseline"] == pytest.approx(r["img_s"] / base["img_s"])
    ceil = report["decode_ceilings"]
    assert ceil["stored"]["img_s"] > 0 and 40 <= ceil["stored"]["mean_side"] <= 48  # pre-resized to --max-side
    assert ceil["original"]["img_s"] > 0 and ceil["original"]["mean_side"] > 50
    assert report["settings"]["images"] == 12 and report["settings"]["views"] == "2x32 + 2x16"
    assert set(report["targets"]) == {"ffcv_full_vs_baseline>=5", "ffcv_crop_vs_ceiling>=0.5"}
    printed = capsys.readouterr().out
    assert "JPEG decode ceiling" in printed and "x baseline" in printed
    assert sum(line.startswith(("crop ", "full ")) for line in printed.splitlines()) == len(expected)


def test_unknown_loader_is_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--data-dir", str(tmp_path), "--loaders", "ffcv,nope"])


def test_texture_is_photo_like():
    """Generated images compress like photos (q90 JPEG of ~430 px between 40 and 160 KB), not like flat colour."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = bench.render_texture(rng, 430, 430)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    assert img.dtype == np.uint8 and img.shape == (430, 430, 3)
    assert 40_000 < len(buf.getvalue()) < 160_000
