"""[0] Write prepared samples (:class:`scan.SpooledSamples`) as webdataset tar shards + DALI index files.

Output directory (read natively by ``nvidia.dali.fn.readers.webdataset``):

* ``shard-000000.tar`` ...: ustar files with deterministic headers. Sample ``i`` (the ``i``-th surviving image, same
  numbering as the ``.beton`` and ``samples.tsv``) has key ``%08d % i`` and members ``<key>.jpg`` (the same bytes as
  the ``.beton``), ``<key>.cls`` (class index as ASCII, the webdataset convention) and ``<key>.lbl`` (two
  little-endian int32 ``[label, sample_index]``, so DALI hands out numbers without host-side parsing). Samples are
  written in a seeded permutation, because DALI's ``random_shuffle`` only mixes within a buffer and class-sorted
  shards would give single-class batches. Shards are cut at ``shard_bytes``; DALI shards samples, not files.
* ``shard-000000.idx`` ...: DALI's ``wds2idx`` format ``v1.2`` (``v1.2 <num_samples>``, then per sample one line of
  ``<ext> <data_offset> <size> <member_name>`` per member), so neither ``wds2idx`` nor GNU tar runs afterwards.
Reading it::

    jpg, lbl = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "lbl"],
                                     dtypes=[types.UINT8, types.INT32], random_shuffle=True,
                                     shard_id=rank, num_shards=world_size, pad_last_batch=True, name="Reader")
    images = fn.decoders.image(jpg, device="mixed", output_type=types.RGB)   # label = lbl[0], index = lbl[1]
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from pipeline.convert.scan import SpooledSamples

INDEX_VERSION = "v1.2"
EXTENSIONS = ("jpg", "cls", "lbl")
TAR_BLOCK = 512


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: file names (relative to the output directory) and its sample count."""

    tar: str
    index: str
    num_samples: int


def sample_key(i: int) -> str:
    """Webdataset key of sample ``i`` (no dots: DALI splits member names at the first dot)."""
    return f"{i:08d}"


def _members(samples: SpooledSamples, i: int, jpeg: bytes) -> list[tuple[str, bytes]]:
    label = int(samples.labels[i])
    return [("jpg", jpeg), ("cls", str(label).encode()), ("lbl", np.array([label, i], dtype="<i4").tobytes())]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the tar file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    header_offset = tar.offset
    tar.addfile(info, io.BytesIO(data))
    data_offset = header_offset + TAR_BLOCK  # ustar with short names: exactly one header block
    padded = -(-len(data) // TAR_BLOCK) * TAR_BLOCK
    if tar.offset != data_offset + padded:
        raise RuntimeError(f"unexpected tar layout for member {name!r} (long name or pax header?)")
    return data_offset


class _ShardWriter:
    """Writes one ``.tar`` + ``.idx`` pair."""

    def __init__(self, out_dir: str, shard_id: int):
        self.tar_name, self.idx_name = f"shard-{shard_id:06d}.tar", f"shard-{shard_id:06d}.idx"
        self.tar = tarfile.open(os.path.join(out_dir, self.tar_name), "w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []
        self.out_dir = out_dir

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        parts = []
        for ext, data in members:
            offset = _add_member(self.tar, f"{key}.{ext}", data)
            parts.append(f"{ext} {offset} {len(data)} {key}.{ext}")
        self.lines.append(" ".join(parts))

    @property
    def bytes_written(self) -> int:
        return self.tar.offset

    def close(self) -> ShardInfo:
        self.tar.close()
        with open(os.path.join(self.out_dir, self.idx_name), "w") as f:
            f.write(f"{INDEX_VERSION} {len(self.lines)}\n")
            f.write("\n".join(self.lines) + "\n")
        return ShardInfo(self.tar_name, self.idx_name, len(self.lines))


def write_shards(out_dir: str, samples: SpooledSamples, shard_bytes: int, seed: int = 0,
                 progress: bool = True) -> list[ShardInfo]:
    """Write all samples into ``out_dir`` (an existing, empty temporary directory) as tar shards + indices.

    Args:
        out_dir: destination directory.
        samples: prepared samples; ``len(samples) > 0``.
        shard_bytes: start a new shard once the current one exceeds this many bytes.
        seed: seed of the storage permutation.
        progress: show a tqdm bar.

    Returns:
        The written shards in order.
    """
    from tqdm import tqdm

    order = np.random.default_rng(seed).permutation(len(samples))
    shards: list[ShardInfo] = []
    writer = _ShardWriter(out_dir, 0)
    with open(samples.spool_path, "rb") as spool:
        for i in tqdm(order, desc="dali shards", unit="img", disable=not progress, smoothing=0.1):
            if writer.lines and writer.bytes_written >= shard_bytes:
                shards.append(writer.close())
                writer = _ShardWriter(out_dir, len(shards))
            writer.add(sample_key(int(i)), _members(samples, int(i), samples.read(int(i), spool)))
    shards.append(writer.close())
    return shards


def read_index(path: str) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a ``v1.2`` index file into one ``{ext: (offset, size, member_name)}`` dict per sample (for tests/tools).

    Raises:
        ValueError: wrong version line or sample count.
    """
    with open(path) as f:
        header, *lines = f.read().splitlines()
    version, count = header.split()
    if version != INDEX_VERSION or int(count) != len(lines):
        raise ValueError(f"{path}: bad index header {header!r} for {len(lines)} sample lines")
    out = []
    for line in lines:
        tok = line.split()
        out.append({tok[j]: (int(tok[j + 1]), int(tok[j + 2]), tok[j + 3]) for j in range(0, len(tok), 4)})
    return out
