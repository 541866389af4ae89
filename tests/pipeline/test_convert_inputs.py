"""convert_dataset.py on bad inputs: every case is converted correctly or skipped with a reason; CLI error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline.convert.prepare as prepare
from convert_dataset import main
from pipeline.convert.build import convert
from pipeline.convert.scan import ConvertError
from tests.pipeline.test_convert import REPO, assert_close, beton_samples, decode, samples_tsv


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "convert_dataset.py"), "-q", "-j", "1", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_inputs_converted_or_reported(bad_tree, tmp_path):
    out = tmp_path / "bad.beton"
    s = convert(str(bad_tree.root), str(out), "ffcv", workers=1, progress=False)
    report = json.loads((tmp_path / "bad.report.json").read_text())
    reasons = {e["path"]: e["reason"] for e in report["skipped_inputs"]}
    rows = {p: (i, lab) for i, lab, p in samples_tsv(str(tmp_path / "bad.samples.tsv"))}
    for rel, outcome in bad_tree.expect.items():
        if outcome == "ok":
            assert rel in rows and rel not in reasons, f"{rel} should be converted ({reasons.get(rel)})"
        else:
            assert rel not in rows and outcome in reasons.get(rel, ""), f"{rel}: want '{outcome}', {reasons.get(rel)}"
    assert s.skipped == len(reasons) == sum(v != "ok" for v in bad_tree.expect.values())
    assert report["skipped_by_reason"]["truncated image"] == 1
    stored = beton_samples(str(out))
    for rel, ref in bad_tree.reference.items():
        jpeg, h, w, label = stored[rows[rel][0]]
        assert label == rows[rel][1] and b"\xff\xc2" not in jpeg  # baseline JPEG, 3 channels
        assert_close(decode(jpeg), ref, rel)


def test_permission_denied_is_reported(bad_tree, tmp_path, monkeypatch):
    """Unreadable files: a real chmod 000 when not root, a simulated PermissionError otherwise."""
    target = bad_tree.root / "a/ok.jpg"
    if os.geteuid() != 0:
        target.chmod(0)
    else:
        real_open = open

        def fake_open(path, *a, **k):
            if os.path.abspath(path) == str(target):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(prepare, "open", fake_open, raising=False)
    s = convert(str(bad_tree.root), str(tmp_path / "p.beton"), "ffcv", workers=1, progress=False)
    assert any(k.path == "a/ok.jpg" and "unreadable: Permission denied" in k.reason for k in s.skips)


def test_strict_cli_fails_and_writes_nothing(bad_tree, tmp_path):
    out = tmp_path / "strict.beton"
    r = run_cli("--src", str(bad_tree.root), "--out", str(out), "--strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--strict" in r.stderr and "a/truncated.jpg: truncated image" in r.stderr
    assert not out.exists() and not (tmp_path / "strict.manifest.json").exists()
    assert (tmp_path / "strict.report.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_cli_converts_bad_tree_without_strict(bad_tree, tmp_path, capsys):
    assert main(["-q", "-j", "1", "--src", str(bad_tree.root), "--out", str(tmp_path / "d"), "--format", "dali"]) == 0
    out = capsys.readouterr().out
    n_ok = sum(v == "ok" for v in bad_tree.expect.values())
    assert f"wrote {n_ok} images, skipped {len(bad_tree.expect) - n_ok}" in out
    assert "d.report.json" in out and (tmp_path / "d/manifest.json").exists()


@pytest.mark.parametrize("case", ["missing", "not_a_dir", "no_classes", "only_empty_classes", "only_junk"])
def test_cli_clear_error_for_missing_or_empty_input(case, tmp_path, capsys):
    src = tmp_path / "src"
    if case == "not_a_dir":
        src.write_text("x")
    elif case == "no_classes":
        src.mkdir()
    elif case == "only_empty_classes":
        (src / "a").mkdir(parents=True)
        (src / "b").mkdir()
    elif case == "only_junk":
        (src / "a").mkdir(parents=True)
        (src / "a/readme.txt").write_text("x")
    args = ["--src", str(src), "--out", str(tmp_path / "o.beton")]
    if case == "missing":  # one case through a real subprocess, the others through main() in-process
        r = run_cli(*args)
        code, err = r.returncode, r.stderr
    else:
        code, err = main(["-q", "-j", "1", *args]), capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "error:" in err
    want = {"missing": "does not exist", "not_a_dir": "is not a directory"}.get(case, "empty dataset")
    assert want in err and str(src) in err
    assert not (tmp_path / "o.beton").exists()


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "src/a").mkdir(parents=True)
    (tmp_path / "src/a/x.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ConvertError, match="no image .* could be converted"):
        convert(str(tmp_path / "src"), str(tmp_path / "o.beton"), workers=1, progress=False)
    assert not (tmp_path / "o.beton").exists() and (tmp_path / "o.report.json").exists()


def test_file_list_and_class_index(good_tree, tmp_path):
    flist = tmp_path / "list.txt"
    flist.write_text("# subset\nbanana/img1.JPEG\n\ncherry/img0.JPEG\nbanana/img1.JPEG\nbanana/missing.JPEG\n"
                     f"{good_tree.root}/cherry/img2.JPEG\n")
    s = convert(str(good_tree.root), str(tmp_path / "l.beton"), file_list=str(flist), workers=1, progress=False)
    reasons = {k.path: k.reason for k in s.skips}
    assert s.written == 3 and "duplicate entry" in reasons["banana/img1.JPEG"]
    assert "unreadable" in reasons["banana/missing.JPEG"]
    classes = json.loads((tmp_path / "l.classes.json").read_text())["class_to_idx"]
    assert classes == {"banana": 0, "cherry": 1}  # classes of the list only
    # Reuse that index for another conversion: apple is unknown there and gets skipped, labels stay consistent.
    s2 = convert(str(good_tree.root), str(tmp_path / "v.beton"), class_index=str(tmp_path / "l.classes.json"),
                 workers=1, progress=False)
    assert s2.written == 8 and all("not in the class index" in k.reason for k in s2.skips if "apple" in k.path)
    labels = {p.split("/")[0]: lab for _, lab, p in samples_tsv(str(tmp_path / "v.samples.tsv"))}
    assert labels == {"banana": 0, "cherry": 1}


def test_resize_limits_and_reencode_policy(good_tree, tmp_path):
    s = convert(str(good_tree.root), str(tmp_path / "s.beton"), max_side=0, short_side=40, workers=1,
                progress=False)
    for jpeg, h, w, _ in beton_samples(str(tmp_path / "s.beton")):
        assert min(h, w) == 40 or (min(h, w) < 40 and max(h, w) <= 120)  # never upscaled
        assert decode(jpeg).shape[:2] == (h, w)
    # Unresized sources: "auto" keeps the original bytes only when re-encoding would not save >10%.
    convert(str(good_tree.root), str(tmp_path / "k.beton"), max_side=0, jpeg_quality=95, workers=1, progress=False)
    kept = sum(j == (good_tree.root / p).read_bytes()
               for (j, *_), (_, _, p) in zip(beton_samples(str(tmp_path / "k.beton")),
                                             samples_tsv(str(tmp_path / "k.samples.tsv"))))
    assert kept == s.written  # q95 sources re-encoded at q95 do not shrink by 10%
    convert(str(good_tree.root), str(tmp_path / "a.beton"), max_side=0, reencode="always", workers=1,
            progress=False)
    assert all(j != (good_tree.root / p).read_bytes()
               for (j, *_), (_, _, p) in zip(beton_samples(str(tmp_path / "a.beton")),
                                             samples_tsv(str(tmp_path / "a.samples.tsv"))))


def test_sixteen_bit_scaling_is_not_saturated(tmp_path):
    """A dark 16-bit image must stay dark (Pillow's convert('RGB') would clip every value > 255 to white)."""
    from PIL import Image

    g16 = np.full((16, 16), 20000, dtype=np.uint16)  # 20000 / 257 = 77.8
    (tmp_path / "src/a").mkdir(parents=True)
    Image.fromarray(g16).save(tmp_path / "src/a/g.png")
    convert(str(tmp_path / "src"), str(tmp_path / "g.beton"), workers=1, progress=False)
    pix = decode(beton_samples(str(tmp_path / "g.beton"))[0][0])
    assert np.abs(pix.astype(int) - 78).max() <= 1


def test_large_jpeg_draft_decode_and_exif_rotation(tmp_path):
    """Shrinking >= 2x goes through Pillow's DCT draft; size and pixels must match a full-resolution bicubic resize,
    also when EXIF orientation swaps the axes."""
    from PIL import Image

    from tests.pipeline.conftest import smooth_image

    arr = smooth_image(np.random.default_rng(5), 200, 300)
    (tmp_path / "src/a").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "src/a/plain.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "src/a/rot.jpg", quality=95, exif=exif.tobytes())
    convert(str(tmp_path / "src"), str(tmp_path / "o.beton"), max_side=64, workers=1, progress=False)
    (plain, h0, w0, _), (rot, h1, w1, _) = beton_samples(str(tmp_path / "o.beton"))
    assert (h0, w0) == (43, 64) and (h1, w1) == (64, 43)
    src = np.asarray(Image.open(tmp_path / "src/a/plain.jpg").convert("RGB"))
    ref = np.asarray(Image.fromarray(src).resize((64, 43), Image.Resampling.BICUBIC))
    assert_close(decode(plain), ref, "draft-decoded")
    assert_close(decode(rot), np.rot90(ref, k=-1), "draft-decoded + rotated")
