"""Writing shard sets: ``write_shards`` (tar shards + ``manifest.json`` with counts, keys, sha256
and per-sample byte offsets, swapped in only once complete) and ``index_shards`` (a manifest for
existing shards that have none)."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.data import remote
from pipeline.data.paths import inside, member_name
from pipeline.data.shards import (
    MANIFEST,
    TAR_SUFFIXES,
    iter_samples,
    sample_offsets,
    sha256_file,
)


def index_shards(files: Sequence[str]) -> str:
    """Write ``manifest.json`` (counts, keys, sha256 and per-sample offsets) beside existing shards
    that have none, so later readers enter them at a unit's first sample by a range request. Built
    once: each shard is read twice (headers, then the bytes for its sha256). Returns its path/URL."""
    folders = {f.rsplit("/", 1)[0] for f in files}
    if len(folders) != 1 or any(f.startswith(remote.PIPE) for f in files):
        raise ConfigError(f"index: shards must share one folder to get a {MANIFEST} ({len(folders)} folders)")
    (folder,) = folders
    target = f"{folder}/{MANIFEST}"
    if remote.exists(target):
        raise ConfigError(f"index: {target} exists already")
    entries = []
    for f in files:
        keys, count = set(), 0
        for sample in iter_samples(f, exts=()):
            count += 1
            keys.update(k for k in sample if not k.startswith("__"))
        entries.append({"path": f.rsplit("/", 1)[1], "count": count, "keys": sorted(keys), "sha256": sha256_file(f),
                        **({"offsets": sample_offsets(f)} if not f.endswith((".gz", ".tgz")) else {})})
    text = json.dumps({"format": "webdataset", "total": sum(e["count"] for e in entries), "shards": entries}, indent=1)
    if remote.is_url(target):
        fs, inner = remote.filesystem(target)
        fs.pipe_file(inner, text.encode())
    else:
        Path(target).write_text(text)
    return target





_SOURCE: Any = None  # the item source, inherited by forked writer processes (never pickled)
_TO_SAMPLE: Callable | None = None


def write_shards(
    items: Sequence,
    to_sample: Callable[[Any], dict],
    out_dir: str | Path,
    prefix: str = "shard",
    max_count: int = 1000,
    max_size: float = 1e9,
    compress: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``to_sample(items[i])`` for every i into ``out_dir/<prefix>-NNNNNN.tar[.gz]`` and a
    manifest. Work is split into chunks of ``max_count`` items written by ``workers`` processes;
    shard numbering follows item order whatever the number of workers.

    The new set is built in a hidden folder inside ``out_dir`` and swapped in only when complete,
    manifest last: a failure leaves the previous shards and manifest exactly as they were, and
    ``items`` may read the very shards being replaced (re-sharding a set onto itself)."""
    global _SOURCE, _TO_SAMPLE
    from tqdm import tqdm

    out = Path(out_dir)
    if "/" in prefix:
        raise ConfigError(f"prefix: {prefix!r} must be a file name, without '/'")
    inside(out, prefix, "prefix")
    out.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".building-", dir=out))
    n = len(items)
    chunks = [(i, min(i + max_count, n), str(build), prefix, max_count, max_size, compress)
              for i in range(0, n, max_count)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks) or 1))
    _SOURCE, _TO_SAMPLE = items, to_sample
    suffix = ".tar.gz" if compress else ".tar"
    entries: list[dict] = []
    bar = tqdm(total=n, desc=f"shard {out.name}", unit="sample", disable=not progress, dynamic_ncols=True)
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for written in (pool.imap(_write_chunk, chunks) if pool else map(_write_chunk, chunks)):
            for tmp, count, keys in written:
                final = build / f"{prefix}-{len(entries):06d}{suffix}"
                os.replace(tmp, final)
                entries.append({"path": final.name, "count": count, "keys": keys, "sha256": sha256_file(final),
                                **({} if compress else {"offsets": sample_offsets(str(final))})})
                bar.update(count)
        manifest = {"format": "webdataset", "total": sum(e["count"] for e in entries), "shards": entries}
        (build / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _swap_in(build, out, prefix, [e["path"] for e in entries])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
        _SOURCE = _TO_SAMPLE = None
        shutil.rmtree(build, ignore_errors=True)
    return manifest


def _swap_in(build: Path, out: Path, prefix: str, names: list[str]) -> None:
    """Replace the ``prefix`` shards and the manifest of ``out`` by those complete in ``build``.
    Only renames: old files move aside first, the new manifest comes last; on any error the
    moves are undone, so ``out`` holds either the old set or the new one."""
    aside = build / ".previous"
    aside.mkdir()
    old = [p for p in out.glob(f"{prefix}-*") if p.is_file() and (p.name.endswith(TAR_SUFFIXES) or ".tmp" in p.name)]
    old += [out / MANIFEST] if (out / MANIFEST).exists() else []
    moved: list[tuple[Path, Path]] = []
    try:
        for p in old:
            os.replace(p, aside / p.name)
            moved.append((aside / p.name, p))
        for name in [*names, MANIFEST]:
            os.replace(build / name, out / name)
            moved.append((out / name, build / name))
    except BaseException:
        for now, before in reversed(moved):
            os.replace(now, before)
        raise


def _write_chunk(args) -> list[tuple[str, int, list[str]]]:
    """Write items ``lo..hi`` (one chunk) into temporary shards; returns (path, count, keys) each."""
    import webdataset as wds

    lo, hi, out, prefix, max_count, max_size, compress = args
    pattern = f"{out}/{prefix}-c{lo:09d}-%03d.tmp"
    written: list[tuple[str, int, set]] = []
    # Plain tar first, gzip afterwards: tarfile's gzip stream stamps the current time into the
    # header, which would make identical data produce different bytes (and sha256s) per run.
    writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0,
                             encoder=False, mtime=0)
    try:
        for i in range(lo, hi):
            sample = _TO_SAMPLE(_SOURCE[i])
            exts = [k for k in sample if not k.startswith("_")]
            for ext in exts:  # a member name leaving the shard root would let an extractor write anywhere
                member_name(str(sample.get("__key__")), ext, f"item {i}")
            before = writer.fname
            writer.write(sample)
            if not written or writer.fname != before or writer.count == 1:
                written.append((writer.fname, 0, set()))
            fname, count, keys = written[-1]
            written[-1] = (fname, count + 1, keys | set(exts))
    finally:
        writer.close()
    # ShardWriter opens its first file eagerly; a chunk never ends empty, so every file is counted.
    if compress:
        for f, _, _ in written:
            _gzip_in_place(f)
    return [(f, c, sorted(k)) for f, c, k in written]


def _gzip_in_place(path: str) -> None:
    """Compress ``path`` with a fixed header (no name, mtime 0) so output is byte-reproducible."""
    tmp = path + ".gz"
    with (open(path, "rb") as src, open(tmp, "wb") as raw,
          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as dst):
        while block := src.read(1 << 20):
            dst.write(block)
    os.replace(tmp, path)
