"""The conversion manifest's content checksums (same-size corruption is not "up to date"), convert_dataset.py
--verify, and the clean-up of what killed conversions leave behind (spool files, ffcv shared memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import convert_dataset
from pipeline.convert.build import convert
from pipeline.convert.manifest import SHM_DIR, SHM_PREFIX


def _convert(src, out, fmt="both", **kw):
    return convert(str(src), str(out), fmt, workers=1, progress=False, **kw)


def flip_byte(path, offset=None):
    """Same-size corruption: one byte inverted in the middle of the file."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if offset is None else offset)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def both(good_tree, tmp_path):
    """``--format both`` output of the good tree: (src, out root)."""
    out = tmp_path / "out"
    _convert(good_tree.root, out)
    return good_tree.root, out


def test_same_size_corruption_is_not_up_to_date(both):
    src, out = both
    beton = out / "ffcv/train.beton"
    flip_byte(beton)
    logs: list[str] = []
    s = _convert(src, out, log=logs.append)
    assert not s.up_to_date and f"{beton}: content differs from the manifest's checksum (modified or corrupted on " \
        "disk); rebuilding" in logs
    assert _convert(src, out).up_to_date  # rebuilt: the checksum matches again


def _old_manifest(out):
    """Rewrite the ffcv manifest as older versions wrote it: {name: size}, no checksum."""
    path = out / "ffcv/train.manifest.json"
    m = json.loads(path.read_text())
    m["files"] = {n: e["size"] for n, e in m["files"].items()}
    path.write_text(json.dumps(m))


VERIFY = [  # (change to a complete output, fragments of the one-line message)
    (lambda out: flip_byte(out / "ffcv/train.beton"), ["ffcv/train.beton: content differs"]),
    (lambda out: flip_byte(out / "dali/train/shard-000000.tar", 700), ["dali/train/shard-000000.tar: content differs"]),
    (lambda out: (out / "ffcv/train.samples.tsv").write_text("x"), ["train.samples.tsv: 1 bytes, the manifest says"]),
    (lambda out: (out / "dali/train/classes.json").unlink(), ["dali/train/classes.json: missing"]),
    (lambda out: (out / "ffcv/train.manifest.json").unlink(), ["no readable manifest", "train.manifest.json"]),
    (_old_manifest, ["train.manifest.json: written by an older version, without content checksums"]),
]


@pytest.mark.parametrize("change, fragments", VERIFY, ids=["beton", "shard", "size", "missing", "no-manifest", "old"])
def test_verify_names_the_bad_file(both, change, fragments, capsys):
    src, out = both
    argv = ["--src", str(src), "--out", str(out), "--format", "both", "--verify"]
    assert convert_dataset.main(argv) == 0 and "verified" in capsys.readouterr().out
    change(out)
    assert convert_dataset.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-convert" in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_stale_spool_and_shared_memory_of_a_killed_writer_are_removed(both):
    src, out = both
    dead, alive = dead_pid(), os.getpid()
    spool = out / "ffcv" / f".train.beton.spool-{dead}"  # kill -9 while the DALI shards of --format both were written
    spool.write_bytes(b"\0" * 1000)
    live_spool = out / "ffcv" / f".train.beton.spool-{alive}"
    live_spool.write_bytes(b"\0")
    shm = [os.path.join(SHM_DIR, f"{SHM_PREFIX}{pid}-0a1b2c3d") for pid in (dead, alive)]
    for p in shm:
        open(p, "wb").close()
    logs: list[str] = []
    try:
        s = _convert(src, out, log=logs.append)
        assert s.up_to_date  # nothing to rebuild, and still cleaned
        assert not spool.exists() and live_spool.exists()
        assert not os.path.exists(shm[0]) and os.path.exists(shm[1])
        assert sum("removed stale" in m for m in logs) == 2 and any("ffcv shared memory" in m for m in logs)
    finally:
        for p in shm:
            if os.path.exists(p):
                os.remove(p)


def test_ffcv_writer_shared_memory_carries_the_owner_pid(good_tree, tmp_path):
    from pipeline.convert.write_ffcv import _OwnedSharedMemory

    block = _OwnedSharedMemory.SharedMemory(create=True, size=64)
    try:
        assert block.name.startswith(f"{SHM_PREFIX}{os.getpid()}-")
    finally:
        block.close()
        block.unlink()
    _convert(good_tree.root, tmp_path / "x.beton", "ffcv")
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getpid()}-")]  # freed after use


def test_manifest_without_checksums_is_rebuilt(both):
    src, out = both
    _old_manifest(out)
    logs: list[str] = []
    assert not _convert(src, out, log=logs.append).up_to_date
    assert any("without content checksums; rebuilding" in m for m in logs)
