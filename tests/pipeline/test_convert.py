"""convert_dataset.py / pipeline.convert.build: round trips through FFCV and DALI, bad inputs, atomicity, caching."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert.build import convert
from pipeline.convert.scan import ConvertError
from pipeline.convert.write_dali import read_index

REPO = Path(__file__).resolve().parents[2]


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def expected_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    f = min(1.0, max_side / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def resized_reference(ref: np.ndarray, max_side: int) -> np.ndarray:
    h, w = expected_size(*ref.shape[:2], max_side)
    if (h, w) == ref.shape[:2]:
        return ref
    return np.asarray(Image.fromarray(ref).resize((w, h), Image.Resampling.BICUBIC))


def assert_close(stored: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Within JPEG q90 tolerance of ``ref``: at most 1.5x (+1) the error of encoding ``ref`` itself at q90.

    A channel swap, a wrong 16-bit scaling or a wrong colour conversion is far outside.
    """
    assert stored.shape == ref.shape, f"{what}: shape {stored.shape} != {ref.shape}"
    buf = io.BytesIO()
    Image.fromarray(ref).save(buf, format="JPEG", quality=90)
    own = np.abs(decode(buf.getvalue()).astype(np.int32) - ref.astype(np.int32))
    diff = np.abs(stored.astype(np.int32) - ref.astype(np.int32))
    ok = diff.mean() < 1.5 * own.mean() + 1 and np.percentile(diff, 99) < 1.5 * np.percentile(own, 99) + 6
    assert ok, f"{what}: mean {diff.mean():.2f} (q90 self {own.mean():.2f}) max {diff.max()}"


def beton_samples(path: str) -> list[tuple[bytes, int, int, int]]:
    """(jpeg bytes, height, width, label) per sample, read from the raw .beton through ffcv's Reader."""
    from ffcv.reader import Reader

    r = Reader(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size_of = {int(ptr): int(size) for _, ptr, size in r.alloc_table}
    img, lab = r.metadata["f0"], r.metadata["f1"]
    return [(bytes(data[int(m["data_ptr"]): int(m["data_ptr"]) + size_of[int(m["data_ptr"])]]), int(m["height"]),
             int(m["width"]), int(lab[i])) for i, m in enumerate(img)]


def samples_tsv(path: str) -> list[tuple[int, int, str]]:
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return [(int(i), int(lab), p) for i, lab, p in rows]


def dali_read(out_dir: str, num_shards: int = 1, shard_id: int = 0) -> dict[int, tuple[np.ndarray, int, bytes]]:
    """index -> (decoded RGB image, label, raw .cls bytes) through a CPU-only DALI webdataset pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    tars = sorted(glob.glob(os.path.join(out_dir, "*.tar")))
    idxs = [t[:-4] + ".idx" for t in tars]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, cls = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "lbl", "cls"],
                                              dtypes=[types.UINT8, types.INT32, types.UINT8], name="Reader",
                                              shard_id=shard_id, num_shards=num_shards, stick_to_shard=True)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, cls

    p = pipe()
    p.build()
    n = p.reader_meta("Reader")["epoch_size"]
    shard_n = n * (shard_id + 1) // num_shards - n * shard_id // num_shards
    out: dict[int, tuple[np.ndarray, int, bytes]] = {}
    seen = 0
    while seen < shard_n:  # the first shard_n samples of the stream are this shard's epoch
        imgs, lbls, clss = p.run()
        for k in range(min(len(imgs), shard_n - seen)):
            label, index = (int(v) for v in np.array(lbls[k]))
            assert index not in out, f"sample {index} read twice in one epoch"
            out[index] = (np.array(imgs[k]), label, bytes(np.array(clss[k])))
        seen += len(imgs)
    return out


# ------------------------------------------------------------------------------------------------ round trips


def test_roundtrip_ffcv_and_dali(good_tree, tmp_path):
    s = convert(str(good_tree.root), str(tmp_path / "out"), "both", max_side=64, workers=2, progress=False)
    assert (s.written, s.skipped) == (12, 0)
    beton, shards = tmp_path / "out/ffcv/train.beton", tmp_path / "out/dali/train"
    classes = json.loads((tmp_path / "out/ffcv/train.classes.json").read_text())
    assert classes["class_to_idx"] == {"apple": 0, "banana": 1, "cherry": 2}
    rows = samples_tsv(str(tmp_path / "out/ffcv/train.samples.tsv"))
    assert [p for _, _, p in rows] == sorted(good_tree.expect)  # listing order: classes, then files, sorted
    ffcv_rows, dali_rows = beton_samples(str(beton)), dali_read(str(shards))
    assert len(ffcv_rows) == len(dali_rows) == 12
    for i, label, rel in rows:
        assert label == classes["class_to_idx"][rel.split("/")[0]]
        jpeg, h, w, ffcv_label = ffcv_rows[i]
        ref = resized_reference(good_tree.reference[rel], 64)
        assert (h, w) == ref.shape[:2] and ffcv_label == label
        assert jpeg[:2] == b"\xff\xd8" and b"\xff\xc2" not in jpeg  # JPEG, not progressive
        assert_close(decode(jpeg), ref, f"ffcv {rel}")
        dali_img, dali_label, cls = dali_rows[i]
        assert dali_label == label and cls == str(label).encode()
        assert np.abs(dali_img.astype(int) - decode(jpeg).astype(int)).max() <= 2  # same bytes, other IDCT


def test_dali_index_matches_tar_and_shards_split_samples(good_tree, tmp_path):
    out = tmp_path / "d"
    convert(str(good_tree.root), str(out), "dali", max_side=64, shard_mb=0.01, workers=1, progress=False)
    tars = sorted(glob.glob(str(out / "*.tar")))
    assert len(tars) > 1  # 10 KiB shards -> several
    keys = []
    for t in tars:
        with tarfile.open(t) as tf:
            members = {m.name: m for m in tf.getmembers()}
            entries = read_index(t[:-4] + ".idx")
            for entry in entries:
                for ext, (offset, size, name) in entry.items():
                    assert name.endswith("." + ext) and members[name].offset_data == offset
                    assert members[name].size == size
                keys.append(entry["jpg"][2].split(".")[0])
    assert sorted(keys) == [f"{i:08d}" for i in range(12)]
    assert keys != sorted(keys)  # stored in a shuffled order (class-sorted shards defeat DALI's shuffle buffer)
    halves = [dali_read(str(out), num_shards=2, shard_id=k) for k in (0, 1)]  # DALI shards samples over ranks
    assert len(halves[0]) == len(halves[1]) == 6 and sorted(set(halves[0]) | set(halves[1])) == list(range(12))


@pytest.mark.slow
def test_ffcv_loader_reads_beton(tmp_path):
    """ffcv's own Loader + decoder on a .beton of equal-size images gives the stored pixels and labels."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    rng = np.random.default_rng(3)
    root = tmp_path / "src"
    for c in range(3):
        for i in range(3):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
                (40, 32), Image.Resampling.BICUBIC))).save(root / f"c{c}/{i}.png")
    convert(str(root), str(tmp_path / "x.beton"), "ffcv", workers=1, progress=False)
    stored = beton_samples(str(tmp_path / "x.beton"))
    loader = Loader(str(tmp_path / "x.beton"), batch_size=9, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = next(iter(loader))
    assert labels.reshape(-1).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(9):
        diff = np.abs(images[i].astype(int) - decode(stored[i][0]).astype(int))
        assert diff.max() <= 8 and diff.mean() < 1.5  # same bytes; ffcv's libjpeg-turbo uses the fast IDCT
        png = np.asarray(Image.open(root / f"c{i // 3}/{i % 3}.png").convert("RGB"))
        assert_close(images[i], png, f"loader sample {i}")


# ------------------------------------------------------------------------------------------------ atomicity


def visible_and_hidden(d: Path) -> tuple[list[str], list[str]]:
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []
    return [n for n in names if not any(part.startswith(".") for part in Path(n).parts)], \
        [n for n in names if any(part.startswith(".") for part in Path(n).parts)]


def test_interrupted_conversion_leaves_no_output(good_tree, tmp_path, monkeypatch):
    import pipeline.convert.build as conv

    calls = {"n": 0}
    real = conv.read_and_prepare

    def flaky(path, params):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the decode pass
        return real(path, params)

    monkeypatch.setattr(conv, "read_and_prepare", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(str(good_tree.root), str(tmp_path / "out"), "both", workers=1, progress=False)
    visible, hidden = visible_and_hidden(tmp_path / "out")
    assert [v for v in visible if v not in ("ffcv", "dali")] == [] and hidden == []


def test_dali_interrupted_while_writing_shards(good_tree, tmp_path, monkeypatch):
    import pipeline.convert.write_dali as wd

    real, calls = wd._add_member, {"n": 0}

    def flaky(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        return real(tar, name, data)

    monkeypatch.setattr(wd, "_add_member", flaky)
    with pytest.raises(OSError, match="No space"):
        convert(str(good_tree.root), str(tmp_path / "d"), "dali", workers=1, progress=False)
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ignored: started with `&` / nohup by a script; other-child: the caller already has a live child process (a
# DataLoader worker kept alive by a failed test's traceback hung CI here before the watchdog ignored such children)
@pytest.mark.parametrize("sigint", ["default", "ignored", "other-child"])
def test_ffcv_writer_process_death_is_an_error_not_a_hang(good_tree, tmp_path, monkeypatch, sigint):
    import multiprocessing
    import signal
    import time

    import pipeline.load.ffcv_compat as compat

    handler = signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler
    saved = signal.signal(signal.SIGINT, handler)

    def dies(destination, value, malloc):
        os._exit(3)  # e.g. the OOM killer taking ffcv's writer process

    monkeypatch.setattr(compat, "_encode_stored_jpeg", dies)
    monkeypatch.setattr(compat, "WATCHDOG_GRACE_S", 0.5)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    other = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
    if sigint == "other-child":
        other.start()
    try:
        with pytest.raises(RuntimeError, match="writer process died"):
            convert(str(good_tree.root), str(tmp_path / "x.beton"), workers=1, progress=False)
        assert signal.getsignal(signal.SIGINT) == handler  # the caller's handler is back
        if sigint == "other-child":
            assert other.is_alive()  # the failed write's clean-up leaves the caller's processes alone
    finally:
        signal.signal(signal.SIGINT, saved)
        if other.pid is not None:
            other.terminate()
            other.join(5)
    assert not (tmp_path / "x.beton").exists() and not (tmp_path / "x.manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm_before == set()  # ffcv's metadata block was unlinked


def test_full_disk_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    """A disk filling up under ffcv's writer process (seen in CI: the machine's disk is shared) must end the
    conversion with an error that names the output and the space left, and leave no partial output behind."""
    import pipeline.load.ffcv_compat as compat

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        rng = np.random.default_rng(0)
        for i in range(24):  # noise JPEGs of ~150 KB each: ~3.5 MB in all, more than the 2 MiB filesystem holds
            d = tmp_path / "src" / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=95)
        monkeypatch.setattr(compat, "WATCHDOG_GRACE_S", 0.5)
        with pytest.raises((RuntimeError, OSError)) as err:
            convert(str(tmp_path / "src"), str(small / "x.beton"), workers=1, progress=False)
        assert str(small) in str(err.value) and ("MiB free" in str(err.value) or "No space" in str(err.value))
        assert [p.name for p in small.iterdir() if p.suffix == ".beton" or ".beton.tmp" in p.name] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


KILL_SCRIPT = """
import os, sys, time
sys.path.insert(0, {repo!r})
import pipeline.convert.write_dali as wd
real = wd.write_shards
def slow(out_dir, *args):
    shards = real(out_dir, *args)
    open({marker!r}, "w").close()
    time.sleep(120)  # killed here: complete shards, but still in the temporary directory
    return shards
wd.write_shards = slow
from convert_dataset import main
main(["-q", "-j", "1", "--format", "dali", "--src", {src!r}, "--out", {out!r}])
"""


def test_killed_conversion_then_rerun(good_tree, tmp_path):
    out, marker = tmp_path / "k", tmp_path / "marker"
    code = KILL_SCRIPT.format(repo=str(REPO), marker=str(marker), src=str(good_tree.root), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(1200):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), "conversion did not reach the write phase"
        proc.kill()  # SIGKILL: no cleanup handlers run
    finally:
        proc.wait()
    visible, hidden = visible_and_hidden(tmp_path)
    assert not out.exists() and not any(v.startswith("k/") for v in visible)
    assert any(h.startswith(".k.tmp-") for h in hidden)  # the killed run's leftovers, clearly temporary
    s = convert(str(good_tree.root), str(out), "dali", workers=1, progress=False)
    assert s.written == 12 and (out / "manifest.json").exists()
    assert [h for h in visible_and_hidden(tmp_path)[1] if h.startswith(".k.")] == []  # stale temps cleaned


def test_failed_rebuild_keeps_previous_ffcv_output(good_tree, tmp_path, monkeypatch):
    import pipeline.convert.write_ffcv as wf

    out = tmp_path / "r.beton"
    convert(str(good_tree.root), str(out), workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real = wf.write_beton

    def write_then_fail(path, samples, progress=True):
        real(path, samples, progress)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wf, "write_beton", write_then_fail)
    with pytest.raises(OSError, match="No space"):
        convert(str(good_tree.root), str(out), jpeg_quality=70, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "r.report.json"} == \
        {k: v for k, v in before.items() if k != "r.report.json"}  # old output intact, no temporaries
    monkeypatch.undo()
    assert convert(str(good_tree.root), str(out), workers=1, progress=False).up_to_date


# ------------------------------------------------------------------------------------------------ caching


def test_rerun_is_noop_until_settings_or_source_change(good_tree, tmp_path):
    out = tmp_path / "c.beton"
    first = convert(str(good_tree.root), str(out), workers=1, progress=False)
    stamp = (out.stat().st_mtime_ns, (tmp_path / "c.manifest.json").stat().st_mtime_ns)
    again = convert(str(good_tree.root), str(out), workers=1, progress=False)
    assert again.up_to_date and again.written == first.written and "up to date" in str(again)
    assert (out.stat().st_mtime_ns, (tmp_path / "c.manifest.json").stat().st_mtime_ns) == stamp
    data = out.read_bytes()
    forced = convert(str(good_tree.root), str(out), workers=1, progress=False, overwrite=True)
    assert not forced.up_to_date and out.read_bytes() == data  # deterministic output
    logs: list[str] = []
    changed = convert(str(good_tree.root), str(out), jpeg_quality=80, workers=1, progress=False, log=logs.append)
    assert not changed.up_to_date and any("rebuilding" in m for m in logs)
    (good_tree.root / "apple/img0.JPEG").unlink()
    shrunk = convert(str(good_tree.root), str(out), jpeg_quality=80, workers=1, progress=False)
    assert not shrunk.up_to_date and shrunk.written == 11


def test_foreign_output_is_not_clobbered(good_tree, tmp_path):
    (tmp_path / "mine.beton").write_bytes(b"precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/thesis.tex").write_text("precious")
    for out, fmt in ((tmp_path / "mine.beton", "ffcv"), (tmp_path / "dir", "dali")):
        with pytest.raises(ConvertError, match="not a complete convert_dataset.py output"):
            convert(str(good_tree.root), str(out), fmt, workers=1, progress=False)
    assert (tmp_path / "mine.beton").read_bytes() == b"precious" and (tmp_path / "dir/thesis.tex").exists()
    convert(str(good_tree.root), str(tmp_path / "dir"), "dali", workers=1, progress=False, overwrite=True)
    assert not (tmp_path / "dir/thesis.tex").exists() and (tmp_path / "dir/manifest.json").exists()
    again = convert(str(good_tree.root), str(tmp_path / "dir"), "dali", workers=1, progress=False)
    assert again.up_to_date
