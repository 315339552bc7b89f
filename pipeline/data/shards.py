"""Webdataset tar shards on disk: resolving a shard spec into files with sample counts, reading
samples by position, writing shards in parallel with ``webdataset.ShardWriter``, and the manifest.

A sample is a dict ``{"__key__": str, "<ext>": bytes, ...}`` exactly as webdataset and img2dataset
lay it out (tar members ``<key>.<ext>``). ``manifest.json`` beside the shards records, per shard,
its file name, sample count, the keys present and the sha256 of the file.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from pipeline.data import remote
from pipeline.data.paths import escape, inside
from pipeline.data.tarstream import TarStream, split_member

if TYPE_CHECKING:
    from pipeline.data.cache import ShardCache

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
    #: byte offset of each sample's first tar header (uncompressed shards written by ``shard``):
    #: a reader starting at sample i enters the file there, by a range request for a URL
    offsets: tuple[int, ...] = ()


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


@dataclass(frozen=True)
class SpecFiles:
    """Where one shard spec points: its manifest, or (without one) its tar files."""

    #: the spec as a path (relative ones joined to the base), or a URL as given
    given: Path | str
    manifest: Path | str | None
    files: tuple[str, ...] = ()

    @property
    def inputs(self) -> list[str]:
        """What to fingerprint for this spec: the folder or manifest named, or the tar files matched."""
        if isinstance(self.given, str):
            return [str(self.manifest)] if self.manifest else list(self.files)
        return [str(self.given)] if self.given.is_dir() or self.manifest else list(self.files)


def resolve_spec(spec: str | Path, base: Path | None = None) -> SpecFiles:
    """A directory holding ``manifest.json``, a manifest path, a directory of tar files, a brace
    pattern or a glob → its manifest or its tar files, without reading any tar. The one place shard
    specs are interpreted: the loader, ``validate`` and ``tokenize`` all come through here.

    URLs (``s3://``, ``https://``, any fsspec protocol) and ``pipe:COMMAND`` are taken as given,
    without the base: see ``resolve_url``."""
    if remote.is_url(str(spec)):
        return resolve_url(str(spec))
    given = path = Path(spec) if base is None or Path(spec).is_absolute() else base / spec
    if path.is_dir() and (path / MANIFEST).is_file():
        path = path / MANIFEST
    if path.name == MANIFEST:
        if not path.is_file():
            raise ConfigError(f"shards {path}: no such manifest")
        return SpecFiles(given, path)
    if path.is_dir() and not any(p.name.endswith(TAR_SUFFIXES) for p in path.iterdir()):
        raise ConfigError(f"shards {path}: folder holds neither {MANIFEST} nor tar files")
    return SpecFiles(given, None, tuple(list_tar_files(path)))


def resolve_url(spec: str) -> SpecFiles:
    """A URL spec: ``…/manifest.json``; a brace pattern or glob of tar URLs; a folder URL (its
    manifest, else the tar files listed in it); or ``pipe:COMMAND`` (one shard, whose braces expand
    into several commands as in webdataset). Patterns without glob characters are not listed, so
    plain HTTP servers work; a missing shard is found when read."""
    if spec.startswith(remote.PIPE):
        return SpecFiles(spec, None, tuple(expand_braces(spec)))
    if spec.rstrip("/").endswith("/" + MANIFEST):
        if not remote.exists(spec):
            raise ConfigError(f"shards {spec}: no such manifest")
        return SpecFiles(spec, spec)
    files = []
    for pat in expand_braces(spec):
        if pat.endswith(TAR_SUFFIXES) and not any(c in pat for c in "*?["):
            files.append(pat)
            continue
        fs, inner = remote.filesystem(pat)
        proto = pat.split("://", 1)[0]
        if any(c in pat for c in "*?["):
            found = sorted(fs.glob(inner))
        else:  # a folder
            folder = pat.rstrip("/")
            if remote.exists(f"{folder}/{MANIFEST}"):
                return SpecFiles(spec, f"{folder}/{MANIFEST}")
            try:
                found = sorted(e for e in fs.ls(inner, detail=False))
            except (OSError, ValueError) as e:
                raise ConfigError(f"shards {spec}: cannot list this folder ({e}); name the manifest or the files") from None
        files += [f if "://" in f else f"{proto}://{f}" for f in found if f.endswith(TAR_SUFFIXES)]
    if not files:
        raise ConfigError(f"shards {spec}: no tar files found")
    return SpecFiles(spec, None, tuple(files))


def open_shards(spec: str | Path | Sequence[str | Path], base: Path | None = None) -> ShardSet:
    """Resolve a shard spec (see ``resolve_spec``) or a list of them into a ``ShardSet``. Shards
    without a manifest are counted by reading tar headers; shards a manifest lists must exist."""
    if isinstance(spec, (list, tuple)):
        parts = [open_shards(s, base) for s in spec]
        return ShardSet(tuple(s for p in parts for s in p.shards))
    found = resolve_spec(spec, base)
    if found.manifest is None:
        return ShardSet(tuple(Shard(f, count_samples(f)) for f in found.files))
    shardset = read_manifest(found.manifest)
    if remote.is_url(str(found.manifest)):
        return shardset  # one request per shard to check each exists would cost more than reading it
    missing = next((s.path for s in shardset.shards if not os.path.isfile(s.path)), None)
    if missing is not None:
        raise ConfigError(f"{found.manifest}: lists shard {Path(missing).name}, which does not exist "
                          f"({sum(not os.path.isfile(s.path) for s in shardset.shards)} of {len(shardset)} missing)")
    return shardset


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


def read_manifest(path: Path | str) -> ShardSet:
    """The shards a manifest lists (paths relative to its folder, which they may not leave); the
    manifest may be a URL, its shards are then URLs beside it."""
    url = remote.is_url(str(path))
    try:
        data = json.loads(remote.read_text(str(path)) if url else Path(path).read_text())
        entries = [(s["path"], int(s["count"]), s.get("sha256"), tuple(s.get("keys", ())),
                    tuple(int(o) for o in s.get("offsets", ()))) for s in data["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a valid shard manifest ({type(e).__name__}: {e})") from None
    shards = []
    for name, count, sha, keys, offsets in entries:
        if len(offsets) != count or any(b <= a for a, b in itertools.pairwise(offsets)):
            offsets = ()  # only a shortcut: without it a reader walks the headers (validate reports the count)
        if url:
            if problem := escape(name):
                raise ConfigError(f"{path}: shard: {name!r} {problem}; it must stay beside the manifest")
            where = remote.join(str(path), name)
        else:
            where = str(inside(Path(path).parent, name, f"{path}: shard"))
        shards.append(Shard(where, count, sha, keys, offsets))
    return ShardSet(tuple(shards), manifest=str(path))


def iter_samples(path: str, start: int = 0, stop: int | None = None, exts: Collection[str] | None = None,
                 on_other: Callable[[str, str], None] | None = None,
                 offsets: Sequence[int] = (), cache: ShardCache | None = None,
                 sha256: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples ``start..stop`` of one shard, in tar order, as ``{"__key__", "__index__", ext: bytes}``.
    Samples before ``start`` are stepped over without reading their data. With ``exts``, members of
    other extensions are stepped over too and appear in the sample as None, so a sample still
    shows everything its shard holds. Links and other special members are stepped over; ``on_other``
    hears of each (name, kind). With the shard's ``offsets`` (from its manifest), reading starts at
    sample ``start``'s byte instead of walking the headers before it. With a ``cache``, a URL is read
    from its local copy, or from the store keeping one (``sha256``, the manifest's, names the copy)."""
    key, sample, index = None, {}, -1
    stream = None
    at = offsets[start] if start and len(offsets) > start and not path.endswith((".gz", ".tgz")) else 0
    if at:
        index = start - 1
    try:
        raw = cache.open(path, sha256) if cache is not None and remote.is_url(path) else None
        stream = TarStream(path, on_other, at, raw)
        while (member := stream.next_member()) is not None:
            name, size = member
            name_key, ext = split_member(name)
            if name_key != key:
                if key is not None and index >= start:
                    yield sample
                key, index = name_key, index + 1
                if stop is not None and index >= stop:
                    stream.finish()  # a slice ends here; reached when asked past its last sample (read-ahead)
                    return
                sample = {"__key__": key, "__index__": index}
            if index < start:
                stream.skip(size)
            elif exts is None or ext in exts:
                sample[ext] = stream.read(size)
            else:
                stream.skip(size)
                sample[ext] = None
        stream.finish()
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
        stream = TarStream(path)
        while (member := stream.next_member()) is not None:
            name, size = member
            stream.skip(size)
            key = split_member(name)[0]
            keys += key != last
            last = key
    except (ShardError, EOFError, zlib.error, OSError, ValueError) as e:
        raise ShardError(f"{path}: unreadable tar after sample {last!r}: {e}") from None
    finally:
        if stream is not None:
            stream.close()
    return keys


def sample_offsets(path: str) -> list[int]:
    """Byte offset of each sample's first tar header; empty for a compressed shard (it cannot be
    entered mid-stream)."""
    offsets, last = [], None
    stream = TarStream(path)
    try:
        while (member := stream.next_member()) is not None:
            if stream.compressed:
                return []
            name, size = member
            key = split_member(name)[0]
            if key != last:
                offsets.append(stream.member_start)
                last = key
            stream.skip(size)
    finally:
        stream.close()
    return offsets


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with remote.open_bytes(str(path)) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
