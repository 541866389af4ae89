"""[0] ImageFolder split -> FFCV ``.beton`` and/or DALI webdataset shards: the engine of ``convert_dataset.py``.

Flow: :func:`scan.scan_image_folder` lists the split -> every image is decoded, colour-converted, shrunk and
JPEG-encoded once in a process pool (:func:`prepare.read_and_prepare`) and appended to a temporary spool file
-> each requested format is written from the spool (``write_ffcv``, ``write_dali``), so
``both`` costs one decode/encode pass.

Output naming (``--out``):

* ``ffcv``: ``--out X.beton`` (``.beton`` appended if missing) -> ``X.beton``, ``X.classes.json``,
  ``X.samples.tsv``, ``X.manifest.json`` and ``X.report.json``.
* ``dali``: ``--out D`` (a directory) -> ``D/shard-*.tar``, ``D/shard-*.idx``, ``D/classes.json``,
  ``D/samples.tsv``, ``D/manifest.json``, and the report ``D.report.json`` next to it.
* ``both``: ``--out R`` -> ``R/ffcv/<split>.beton`` (+ sidecars) and ``R/dali/<split>/`` where ``<split>`` is the
  basename of ``--src`` (``--src data/demo/train --out data/demo`` -> ``data/demo/ffcv/train.beton``,
  ``data/demo/dali/train/``).

``classes.json`` = ``{"class_to_idx", "classes", "counts"}``; ``samples.tsv`` = ``index<TAB>label<TAB>source path``
(sample ``i`` is the same image in both formats); the report lists every skipped input with its reason (written
even when ``--strict`` fails). Atomicity: data files are written under hidden temporary names (``.X.tmp-<pid>``)
and renamed when complete; the manifest (settings + source listing fingerprint + each file's size and content
checksum, :mod:`.manifest`) is written last, and an output counts as complete only if its manifest matches,
so a killed conversion never leaves a file that looks valid, a file corrupted in place is rebuilt, and re-running
with the same settings over an unchanged source is a no-op. Temporaries of killed conversions are removed (and
reported) by the next one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.convert.manifest import file_entry, output_state, read_json, remove_stale_temps, verify_output
from pipeline.convert.prepare import Prepared, PrepareParams, read_and_prepare
from pipeline.convert.scan import ConvertError, Listing, Skip, SpooledSamples, scan_image_folder
from pipeline.convert.scan_checks import check_writable
from runtime.atomic import write_text_atomic

FORMAT_VERSION = 1
FORMATS = ("ffcv", "dali", "both")


@dataclass
class Summary:
    """What :func:`convert` did. ``bytes_out`` counts stored JPEG payload bytes, ``bytes_in`` source bytes read."""

    outputs: list[str]
    written: int = 0
    skipped: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    up_to_date: bool = False
    skips: list[Skip] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        outs = "\n".join(f"  -> {o}" for o in self.outputs)
        if self.up_to_date:
            return f"up to date ({self.written} images); nothing to do (pass --overwrite to rebuild)\n{outs}"
        rate = self.written / max(self.seconds, 1e-9)
        per = self.bytes_out / max(self.written, 1) / 1024
        return (f"wrote {self.written} images, skipped {self.skipped} in {self.seconds:.1f} s ({rate:.0f} img/s): "
                f"{self.bytes_out / 2**20:.1f} MiB stored ({per:.1f} KiB/img), {self.bytes_in / 2**20:.1f} MiB read"
                + (f"; skipped inputs listed in {', '.join(self.reports)}" if self.skipped else "") + f"\n{outs}")


@dataclass(frozen=True)
class Target:
    """One output: ``kind`` 'ffcv' (``path`` = the .beton) or 'dali' (``path`` = the shard directory)."""

    kind: str
    path: str

    @property
    def stem(self) -> str:
        return self.path[: -len(".beton")] if self.kind == "ffcv" else self.path

    def sidecar(self, name: str) -> str:
        """Path of ``classes.json`` / ``samples.tsv`` / ``manifest.json`` for this output."""
        return f"{self.stem}.{name}" if self.kind == "ffcv" else os.path.join(self.path, name)

    @property
    def report(self) -> str:
        return f"{self.stem}.report.json"


def resolve_targets(src: str, out: str, fmt: str) -> list[Target]:
    """Output paths for ``--format`` (see the module docstring)."""
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = os.path.abspath(out)
    if fmt == "ffcv":
        return [Target("ffcv", out if out.endswith(".beton") else out + ".beton")]
    if fmt == "dali":
        if out.endswith(".beton"):
            raise ConvertError(f"--out {out}: --format dali writes a directory of shards, not a .beton")
        return [Target("dali", out)]
    split = os.path.basename(os.path.normpath(os.path.abspath(src)))
    return [Target("ffcv", os.path.join(out, "ffcv", split + ".beton")),
            Target("dali", os.path.join(out, "dali", split))]


# ------------------------------------------------------------------------------------------------ caching


def _settings(params: PrepareParams, kind: str, shard_bytes: int, seed: int) -> dict:
    s = {"format_version": FORMAT_VERSION, "kind": kind, **asdict(params)}
    if kind == "dali":
        s.update(shard_bytes=shard_bytes, seed=seed)
    return s


# ------------------------------------------------------------------------------------------------ preparing


def _prepare_one(task: tuple[str, PrepareParams]) -> tuple[Prepared | str, int]:
    path, params = task
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return read_and_prepare(path, params), size


def _results(listing: Listing, params: PrepareParams, workers: int) -> Iterator[tuple[Prepared | str, int]]:
    tasks = ((os.path.join(listing.root, it.path), params) for it in listing.items)
    if workers <= 1:
        yield from map(_prepare_one, tasks)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:  # exiting the block (also on errors/interrupts) terminates the workers
        yield from pool.imap(_prepare_one, tasks, chunksize=8)


def prepare_all(listing: Listing, params: PrepareParams, spool_path: str, workers: int,
                progress: bool) -> tuple[SpooledSamples, list[Skip], int]:
    """Prepare every listed image into ``spool_path``; returns (samples, skips, source bytes read)."""
    from tqdm import tqdm

    offsets, sizes, heights, widths, labels, paths, skips = [], [], [], [], [], [], []
    bytes_in = 0
    results = _results(listing, params, workers)
    bar = tqdm(results, total=len(listing.items), desc="preparing", unit="img", disable=not progress, smoothing=0.1)
    with open(spool_path, "wb") as spool, bar, closing(results):  # closing() stops the pool on errors too
        for item, (res, size) in zip(listing.items, bar):
            bytes_in += size
            if isinstance(res, str):
                skips.append(Skip(item.path, res))
                continue
            offsets.append(spool.tell())
            spool.write(res.jpeg)
            sizes.append(len(res.jpeg))
            heights.append(res.height)
            widths.append(res.width)
            labels.append(item.label)
            paths.append(item.path)
    arr = [np.asarray(a, dtype=np.int64) for a in (offsets, sizes, heights, widths, labels)]
    return SpooledSamples(spool_path, *arr, paths), skips, bytes_in


# ------------------------------------------------------------------------------------------------ writing


def _write_json_atomic(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _classes_json(listing: Listing, samples: SpooledSamples) -> dict:
    counts = np.bincount(samples.labels, minlength=max(listing.class_to_idx.values(), default=-1) + 1)
    classes = sorted(listing.class_to_idx, key=listing.class_to_idx.__getitem__)
    return {"class_to_idx": listing.class_to_idx, "classes": classes,
            "counts": {c: int(counts[i]) for c, i in listing.class_to_idx.items()}}


def _write_samples_tsv(path: str, samples: SpooledSamples) -> None:
    with open(path, "w") as f:
        f.write("index\tlabel\tpath\n")
        f.writelines(f"{i}\t{int(lab)}\t{p}\n" for i, (lab, p) in enumerate(zip(samples.labels, samples.paths)))


def write_report(target: Target, listing: Listing, skips: list[Skip], written: int) -> None:
    """``<out>.report.json``: every skipped input with its reason, plus counts per reason."""
    reasons = Counter(s.reason.split(":")[0] for s in skips)
    _write_json_atomic(target.report, {
        "source": listing.root, "output": target.path, "written": written, "skipped": len(skips),
        "skipped_by_reason": dict(reasons.most_common()),
        "skipped_inputs": [{"path": s.path, "reason": s.reason} for s in skips]})


def _manifest(target: Target, settings: dict, listing: Listing, samples: SpooledSamples, n_skipped: int,
              files: dict[str, int], seconds: float) -> dict:
    return {"settings": settings, "source": listing.root, "source_fingerprint": listing.fingerprint,
            "num_samples": len(samples), "num_classes": len(listing.class_to_idx), "num_skipped": n_skipped,
            "image_bytes": int(samples.sizes.sum()), "files": files, "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def finalize_ffcv(target: Target, samples: SpooledSamples, listing: Listing, progress: bool,
                  meta: Callable[[dict[str, int]], dict]) -> None:
    """Write the .beton + sidecars under temporary names, rename them into place, manifest last."""
    from pipeline.convert.write_ffcv import write_beton

    parent, pid = os.path.dirname(target.path), os.getpid()
    finals = [target.sidecar("classes.json"), target.sidecar("samples.tsv"), target.path]  # .beton renamed last
    temps = [os.path.join(parent, f".{os.path.basename(p)}.tmp-{pid}") for p in finals]
    try:
        with open(temps[0], "w") as f:
            json.dump(_classes_json(listing, samples), f, indent=1)
        _write_samples_tsv(temps[1], samples)
        write_beton(temps[2], samples, progress)
        files = {os.path.basename(p): file_entry(t) for p, t in zip(finals, temps)}
        if os.path.exists(target.sidecar("manifest.json")):
            os.remove(target.sidecar("manifest.json"))  # from here on the old output no longer counts as complete
        for t, p in zip(temps, finals):
            os.replace(t, p)
        _write_json_atomic(target.sidecar("manifest.json"), meta(files))
    finally:
        for t in temps:
            if os.path.exists(t):
                os.remove(t)


def finalize_dali(target: Target, samples: SpooledSamples, listing: Listing, shard_bytes: int, seed: int,
                  progress: bool, meta: Callable[[dict[str, int]], dict]) -> None:
    """Build the shard directory under a temporary name (manifest last inside it) and rename it into place."""
    from pipeline.convert.write_dali import write_shards

    parent, name, pid = os.path.dirname(target.path), os.path.basename(target.path), os.getpid()
    tmp, old = os.path.join(parent, f".{name}.tmp-{pid}"), os.path.join(parent, f".{name}.old-{pid}")
    try:
        os.makedirs(tmp)
        write_shards(tmp, samples, shard_bytes, seed, progress)
        with open(os.path.join(tmp, "classes.json"), "w") as f:
            json.dump(_classes_json(listing, samples), f, indent=1)
        _write_samples_tsv(os.path.join(tmp, "samples.tsv"), samples)
        files = {n: file_entry(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
        _write_json_atomic(os.path.join(tmp, "manifest.json"), meta(files))
        if os.path.lexists(target.path):
            os.rename(target.path, old)
        try:
            os.rename(tmp, target.path)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(target.path):
                os.rename(old, target.path)  # put the previous output back
            raise
    finally:
        for d in (tmp, old):
            if os.path.isdir(d):
                shutil.rmtree(d)
            elif os.path.lexists(d):
                os.remove(d)


# ------------------------------------------------------------------------------------------------ entry point


def _check_args(params: PrepareParams, shard_mb: float, workers: int | None) -> None:
    if not 1 <= params.jpeg_quality <= 100:
        raise ConvertError(f"--jpeg-quality {params.jpeg_quality}: expected 1..100")
    if params.max_side < 0 or params.short_side < 0:
        raise ConvertError(f"--max-side/--short-side must be >= 0 (0 = no limit), got {params.max_side}/"
                           f"{params.short_side}")
    if params.reencode not in ("auto", "always"):
        raise ConvertError(f"--reencode {params.reencode!r}: expected 'auto' or 'always'")
    if shard_mb <= 0:
        raise ConvertError(f"--shard-mb {shard_mb}: must be > 0")
    if workers is not None and workers < 0:
        raise ConvertError(f"--workers {workers}: must be >= 0 (0 = all cores)")


def _plan(targets: list[Target], settings_of: Callable[[Target], dict], listing: Listing, overwrite: bool,
          log: Callable[[str], None]) -> list[Target]:
    """Targets that need (re)building; raises for foreign files in the way unless ``overwrite``."""
    todo = []
    for t in targets:
        state, reason = output_state(t.path, t.sidecar("manifest.json"), settings_of(t), listing.fingerprint)
        if state == "current" and not overwrite:
            continue
        if state == "foreign" and not overwrite:
            raise ConvertError(f"{t.path} exists but is not a complete convert_dataset.py output (no valid "
                               f"{os.path.basename(t.sidecar('manifest.json'))}); remove it or pass --overwrite")
        if state == "stale":
            log(f"{reason}; rebuilding")
        todo.append(t)
    return todo


def verify(src: str, out: str, format: str = "ffcv") -> list[str]:  # noqa: A002
    """Check the existing outputs of ``convert(src, out, format)`` file by file against their manifests' sizes and
    checksums; returns one line per problem, naming the file (empty: every file is as written)."""
    return [p for t in resolve_targets(src, out, format) for p in verify_output(t.path, t.sidecar("manifest.json"))]


def convert(src: str, out: str, format: str = "ffcv", *, file_list: str | None = None,  # noqa: A002
            class_index: str | None = None, max_side: int = 512, short_side: int = 0, jpeg_quality: int = 90,
            reencode: str = "auto", exif_transpose: bool = True, shard_mb: float = 256, seed: int = 0,
            workers: int | None = None, strict: bool = False, overwrite: bool = False, progress: bool = True,
            log: Callable[[str], None] = print, follow_links: bool = False) -> Summary:
    """Convert one ImageFolder split; see the module docstring and ``convert_dataset.py --help``.

    Args:
        src: split directory (``<src>/<class>/<image>``).
        out: output path (``.beton`` for ffcv, a directory for dali, a root directory for both).
        format: 'ffcv' | 'dali' | 'both'.
        file_list, class_index, follow_links: see :func:`scan.scan_image_folder`.
        max_side, short_side, jpeg_quality, reencode, exif_transpose: see :class:`prepare.PrepareParams`.
        shard_mb: dali shard size in MiB.
        seed: seed of the dali storage permutation.
        workers: processes for decoding/encoding (None or 0 = all cores; 1 = in-process).
        strict: fail (no output written) if any input is skipped.
        overwrite: rebuild even if the outputs are up to date (or replace files not written by this tool).
        progress: show tqdm progress bars.
        log: where status lines go.

    Returns:
        A :class:`Summary`.

    Raises:
        ConvertError: missing/empty input, bad arguments, --strict with skipped inputs, foreign output in the way.
    """
    t0 = time.perf_counter()
    params = PrepareParams(max_side, short_side, jpeg_quality, reencode, exif_transpose)
    _check_args(params, shard_mb, workers)
    workers = workers or os.cpu_count() or 1
    shard_bytes = int(shard_mb * 2**20)
    targets = resolve_targets(src, out, format)
    listing = scan_image_folder(src, file_list, class_index, follow_links)
    for w in listing.warnings:
        log(f"warning: {w}")
    if not listing.items:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in listing.skipped[:5])
        raise ConvertError(f"--src {src}: empty dataset, no image files found" + (f" ({reasons})" if reasons else ""))
    for t in targets:  # every target: a killed run's spool sits next to whichever output it was writing
        remove_stale_temps(os.path.dirname(t.path), os.path.basename(t.stem), log)
    settings_of = lambda t: _settings(params, t.kind, shard_bytes, seed)  # noqa: E731
    todo = _plan(targets, settings_of, listing, overwrite, log)
    check_writable([os.path.dirname(t.path) for t in todo])
    if not todo:
        manifest = read_json(targets[0].sidecar("manifest.json")) or {}
        return Summary([t.path for t in targets], written=manifest.get("num_samples", 0), up_to_date=True,
                       seconds=time.perf_counter() - t0)
    return _run(todo, listing, params, settings_of, shard_bytes, seed, workers, strict, progress, t0)


def _run(todo: list[Target], listing: Listing, params: PrepareParams, settings_of: Callable[[Target], dict],
         shard_bytes: int, seed: int, workers: int, strict: bool, progress: bool, t0: float) -> Summary:
    for t in todo:
        os.makedirs(os.path.dirname(t.path), exist_ok=True)
    spool = os.path.join(os.path.dirname(todo[0].path), f".{os.path.basename(todo[0].path)}.spool-{os.getpid()}")
    try:
        samples, skips, bytes_in = prepare_all(listing, params, spool, workers, progress)
        skips = listing.skipped + skips
        for t in todo:
            write_report(t, listing, skips, len(samples))
        reports = [t.report for t in todo]
        if not len(samples):
            raise ConvertError(f"no image in {listing.root} could be converted ({len(skips)} skipped, see "
                               f"{reports[0]})")
        if strict and skips:
            shown = "\n".join(f"  {s.path}: {s.reason}" for s in skips[:20])
            more = f"\n  ... and {len(skips) - 20} more" if len(skips) > 20 else ""
            raise ConvertError(f"--strict: {len(skips)} input(s) skipped, nothing written (see {reports[0]}):\n"
                               f"{shown}{more}")
        for t in todo:
            meta = lambda files, t=t: _manifest(t, settings_of(t), listing, samples, len(skips), files,  # noqa: E731
                                                time.perf_counter() - t0)
            if t.kind == "ffcv":
                finalize_ffcv(t, samples, listing, progress, meta)
            else:
                finalize_dali(t, samples, listing, shard_bytes, seed, progress, meta)
    finally:
        if os.path.exists(spool):
            os.remove(spool)
    return Summary([t.path for t in todo], written=len(samples), skipped=len(skips),
                   bytes_out=int(samples.sizes.sum()), bytes_in=bytes_in, seconds=time.perf_counter() - t0,
                   skips=skips, reports=reports)
