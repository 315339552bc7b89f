"""Webdataset tar shards on disk: resolving a shard spec into files with sample counts, reading
samples by position, writing shards in parallel with ``webdataset.ShardWriter``, and the manifest.

A sample is a dict ``{"__key__": str, "<ext>": bytes, ...}`` exactly as webdataset and img2dataset
lay it out (tar members ``<key>.<ext>``). ``manifest.json`` beside the shards records, per shard,
its file name, sample count, the keys present and the sha256 of the file.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

from pipeline.config import ConfigError

MANIFEST = "manifest.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardError(RuntimeError):
    """A shard that cannot be read as promised; the message names the shard and the sample key."""


@dataclass(frozen=True)
class Shard:
    path: str
    count: int
    sha256: str | None = None
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardSet:
    """An ordered list of shards with their sample counts (from the manifest, or counted once)."""

    shards: tuple[Shard, ...]
    manifest: str | None = None

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def __len__(self) -> int:
        return len(self.shards)


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → three names, zero padding kept (the webdataset / img2dataset notation)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def open_shards(spec: str | Path | Sequence[str | Path], base: Path | None = None) -> ShardSet:
    """Resolve a directory holding ``manifest.json``, a manifest path, a brace pattern, a glob or a
    list of those into a ``ShardSet``. Shards without a manifest are counted by reading tar headers."""
    if isinstance(spec, (list, tuple)):
        parts = [open_shards(s, base) for s in spec]
        return ShardSet(tuple(s for p in parts for s in p.shards))
    path = Path(spec) if base is None or Path(spec).is_absolute() else base / spec
    if path.is_dir() and (path / MANIFEST).is_file():
        path = path / MANIFEST
    if path.name == MANIFEST:
        return read_manifest(path)
    return ShardSet(tuple(Shard(f, count_samples(f)) for f in list_tar_files(path)))


def list_tar_files(path: Path) -> list[str]:
    """The tar files of a directory (without manifest), a brace pattern or a glob; all must exist."""
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES))
    else:
        files = [f for pat in expand_braces(str(path)) for f in (sorted(glob.glob(pat)) or [pat])]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise ConfigError(f"shards {path}: {'no such file ' + missing[0] if missing else 'no tar files found'}")
    return files


def read_manifest(path: Path) -> ShardSet:
    try:
        data = json.loads(path.read_text())
        shards = tuple(
            Shard(str(path.parent / s["path"]), int(s["count"]), s.get("sha256"), tuple(s.get("keys", ())))
            for s in data["shards"]
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e})") from None
    return ShardSet(shards, manifest=str(path))


def _split_member(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): the key ends at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


# Compressed (or plain) bytes taken from the file per read, and the most decoded bytes one inflate
# step may produce (a bound on memory for highly compressible members).
_READ = 1 << 18
_INFLATE = 1 << 22
_GZIP = 16 + zlib.MAX_WBITS


class _TarStream:
    """Sequential reader of tar members (USTAR, GNU long names, PAX paths), with header checksums.

    Shards hold many small members (a 28×28 PNG, a label, some JSON), so the cost is per member,
    not per byte. The file is therefore read (and inflated, for ``.tar.gz``) in large chunks into
    one buffer and headers are parsed straight out of it; ``tarfile`` or one ``read`` call per
    header through ``gzip.GzipFile`` would cost tens of microseconds per member. Only name, size
    and type are parsed. Members the caller does not want are stepped over in the buffer."""

    def __init__(self, path: str):
        self.path = path
        self.raw = open(path, "rb")
        magic = self.raw.read(2)
        self.raw.seek(0)
        self.gz = zlib.decompressobj(_GZIP) if magic == b"\x1f\x8b" else None
        self.pending = b""  # compressed bytes after the end of one gzip member (concatenated .gz)
        self.buf = b""
        self.pos = 0

    def close(self) -> None:
        self.raw.close()

    def _next_chunk(self) -> bytes:
        """The next piece of the tar byte stream; b"" at the end of the file."""
        if self.gz is None:
            return self.raw.read(_READ)
        while True:
            data = self.gz.unconsumed_tail or self.pending or self.raw.read(_READ)
            self.pending = b""
            if not data:
                return b""
            if self.gz.eof:  # another gzip member follows; zero padding between members is allowed
                data = data.lstrip(b"\0")
                if not data:
                    continue
                self.gz = zlib.decompressobj(_GZIP)
            out = self.gz.decompress(data, _INFLATE)
            if self.gz.eof:
                self.pending = self.gz.unused_data
            if out:
                return out

    def _ensure(self, n: int) -> bool:
        """Make ``n`` bytes available at ``pos``; False if the stream ends first."""
        have = len(self.buf) - self.pos
        if have >= n:
            return True
        parts = [self.buf[self.pos:]]
        while have < n:
            chunk = self._next_chunk()
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf = b"".join(parts)
        self.pos = 0
        return have >= n

    def read(self, size: int) -> bytes:
        """The data of the current member (``size`` bytes, then the padding to 512 is dropped)."""
        padded = (size + 511) & ~511
        if not self._ensure(padded):
            raise ShardError("truncated")
        p = self.pos
        self.pos = p + padded
        return self.buf[p:p + size]

    def skip(self, size: int) -> None:
        """Step over the data of the current member without keeping it."""
        n = (size + 511) & ~511
        have = len(self.buf) - self.pos
        if n <= have:
            self.pos += n
            return
        n -= have
        self.buf, self.pos = b"", 0
        if self.gz is None:
            self.raw.seek(n, 1)  # a short file shows up as a truncated next header
            return
        while n:
            chunk = self._next_chunk()
            if not chunk:
                raise ShardError("truncated")
            if len(chunk) > n:
                self.buf, self.pos = chunk, n
                return
            n -= len(chunk)

    def next_member(self) -> tuple[str, int] | None:
        """(name, size) of the next regular file, positioned at its data, which must be ``read``
        or ``skip``-ped before asking for the next member; None at the end-of-archive marker."""
        long_name = None
        while True:
            if len(self.buf) - self.pos < 512 and not self._ensure(512):
                raise ShardError("truncated (no end-of-archive marker)")
            buf, p = self.buf, self.pos
            self.pos = p + 512
            # Adler-32's low half is 1 + (byte sum mod 65521), and 256 bytes sum to at most 65280:
            # two halves give the header's exact byte sum from C code, far cheaper than sum()
            total = (zlib.adler32(buf[p:p + 256]) & 0xFFFF) + (zlib.adler32(buf[p + 256:p + 512]) & 0xFFFF) - 2
            if total == 0:  # an all-zero block ends the archive
                return None
            name, size, checksum, kind, magic, prefix = _HEADER.unpack_from(buf, p)
            if total - sum(checksum) + 256 != _octal(checksum):
                raise ShardError("corrupt tar header (checksum mismatch)")
            size = _octal(size)
            if kind in _NAME_RECORDS:  # GNU long name / PAX extended header: the name of the next member
                meta = self.read(size)
                long_name = meta.rstrip(b"\0").decode() if kind == b"L" else _pax_path(meta) or long_name
                continue
            if long_name is None:
                name = _cstr(name)
                if magic == b"ustar" and prefix[0]:
                    name = f"{_cstr(prefix)}/{name}"
            else:
                name, long_name = long_name, None
            if kind not in _REGULAR:
                self.skip(size)
                continue
            return name, size


#: the header fields read: name, size, checksum, type, magic (without its terminator), prefix
_HEADER = struct.Struct("100s24x12s12x8sc100x5s83x155s12x")
_NAME_RECORDS = (b"L", b"x")
_REGULAR = (b"0", b"\0", b"7")


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0]
    try:
        return int(text, 8)  # int() ignores surrounding blanks, as tar readers do
    except ValueError:
        if text.strip():
            raise
        return 0


def _cstr(field: bytes) -> str:
    """A NUL-terminated header text field."""
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_path(meta: bytes) -> str | None:
    for record in meta.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8", "replace")
    return None


def iter_samples(path: str, start: int = 0, stop: int | None = None,
                 exts: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``start..stop`` of one shard, in tar order, as ``{"__key__", "__index__", ext: bytes}``.
    Samples before ``start`` are stepped over without reading their data. With ``exts``, members of
    other extensions are stepped over too and appear in the sample as None, so a sample still
    shows everything its shard holds."""
    key, sample, index = None, {}, -1
    stream = None
    try:
        stream = _TarStream(path)
        while (member := stream.next_member()) is not None:
            name, size = member
            name_key, ext = _split_member(name)
            if name_key != key:
                if key is not None and index >= start:
                    yield sample
                key, index = name_key, index + 1
                if stop is not None and index >= stop:
                    return
                sample = {"__key__": key, "__index__": index}
            if index < start:
                stream.skip(size)
            elif exts is None or ext in exts:
                sample[ext] = stream.read(size)
            else:
                stream.skip(size)
                sample[ext] = None
        if key is not None and index >= start and (stop is None or index < stop):
            yield sample
    except (ShardError, EOFError, zlib.error, OSError, ValueError) as e:
        where = f"after sample {key!r}" if key else "at the start"
        raise ShardError(f"{path}: unreadable tar {where}: {e}") from None
    finally:
        if stream is not None:
            stream.close()


def count_samples(path: str) -> int:
    """Number of samples in a shard, reading tar headers only."""
    keys, last = 0, None
    stream = None
    try:
        stream = _TarStream(path)
        while (member := stream.next_member()) is not None:
            name, size = member
            stream.skip(size)
            key = _split_member(name)[0]
            keys += key != last
            last = key
    except (ShardError, EOFError, zlib.error, OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable tar after sample {last!r}: {e}") from None
    finally:
        if stream is not None:
            stream.close()
    return keys


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing


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
    shard numbering follows item order whatever the number of workers."""
    global _SOURCE, _TO_SAMPLE
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{prefix}-*"):
        if old.name.endswith(TAR_SUFFIXES) or ".tmp" in old.name:
            old.unlink()
    n = len(items)
    chunks = [(i, min(i + max_count, n), str(out), prefix, max_count, max_size, compress) for i in range(0, n, max_count)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(chunks) or 1))
    _SOURCE, _TO_SAMPLE = items, to_sample
    suffix = ".tar.gz" if compress else ".tar"
    entries: list[dict] = []
    bar = tqdm(total=n, desc=f"shard {out.name}", unit="sample", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            results = map(_write_chunk, chunks)
        else:
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_write_chunk, chunks)
        for written in results:
            for tmp, count, keys in written:
                final = out / f"{prefix}-{len(entries):06d}{suffix}"
                os.replace(tmp, final)
                entries.append({"path": final.name, "count": count, "keys": keys, "sha256": sha256_file(final)})
                bar.update(count)
        if workers > 1:
            pool.close()
            pool.join()
    finally:
        bar.close()
        _SOURCE = _TO_SAMPLE = None
    manifest = {"format": "webdataset", "total": sum(e["count"] for e in entries), "shards": entries}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


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
            before = writer.fname
            writer.write(sample)
            if not written or writer.fname != before or writer.count == 1:
                written.append((writer.fname, 0, set()))
            fname, count, keys = written[-1]
            written[-1] = (fname, count + 1, keys | {k for k in sample if not k.startswith("_")})
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
    with open(path, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    os.replace(tmp, path)
