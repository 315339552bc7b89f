"""Remote shards kept in a local folder of bounded size, shared by every process on a machine.

A shard is kept whole, as one file named after its URL (and its sha256, when a manifest gives one,
so a shard rewritten under the same name is another entry). A reader that goes through a shard from
its first byte copies what it reads into a partial file beside the copies, so keeping a shard costs
no second download; at the end of the shard the partial file is renamed into place, an atomic step,
so another process finds the whole copy or none. A partial file is never served: a killed download
leaves one behind, which readers ignore and a later clean-up deletes once it has gone unwritten for
``STALE`` seconds.

Before a copy is put in place, the least recently read copies are deleted until all fit in
``max_bytes`` (partial files of downloads in flight come on top; files of other names in the folder
are neither counted nor touched). Placing and deleting happen under a lock on the folder
(``flock``), so the workers and runs that share it keep one bound. Deleting a copy that another
process is reading is harmless: its open file stays readable.

The cache only changes where bytes come from: the samples read, their order and the exact resume
are those of reading the store. On a miss, a reader that enters a shard mid-way (a resumed unit, a
unit starting at a recorded offset) reads from the store and keeps nothing; a reader from the start
keeps the copy, and the first slice of a shard cut into slices reads on to the end for it. Two
readers that miss one shard at once both download it; the later copy replaces the earlier.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.data.remote import BLOCK, RemoteFile

log = logging.getLogger(__name__)

#: seconds a partial file may go unwritten before a clean-up takes it for the leftover of a killed
#: download and deletes it
STALE = 3600
PART = ".part-"
_LOCK = ".lock"
#: the names of copies and of partial files: other files in the folder are never counted or deleted
_COPY = re.compile(r"[0-9a-f]{24}-")
_PARTIAL = re.compile(re.escape(PART) + r"[0-9a-f]{24}-")


class ShardCache:
    """Copies of remote shards in ``folder``, at most ``max_bytes`` of them."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        #: in this process: shards opened from a copy, shards read from the store, copies placed,
        #: copies deleted to make room
        self.hits = self.misses = self.kept = self.evicted = 0

    def name(self, url: str, sha256: str | None = None) -> str:
        """The file name of ``url``'s copy: a digest of the URL and the manifest's sha256, then the
        shard's own name (for a person looking into the folder)."""
        digest = hashlib.sha256(f"{url}\n{sha256 or ''}".encode()).hexdigest()[:24]
        tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
        return f"{digest}-{tail}"

    def open(self, url: str, sha256: str | None = None) -> Any:
        """A readable byte stream of ``url``: its copy when one is kept (marked as just used), else
        the store, read through a ``Filling`` stream that keeps a copy if it is read to the end."""
        path = self.folder / self.name(url, sha256)
        try:
            f = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            self.misses += 1
            return Filling(self, url, path, sha256)
        self.hits += 1
        with contextlib.suppress(OSError):  # deleted meanwhile by another process: still readable
            os.utime(path, ns=(time.time_ns(),) * 2)
        return f

    def entries(self) -> list[tuple[int, int, Path]]:
        """(last use in ns, size, path) of every kept copy."""
        out = []
        with os.scandir(self.folder) as it:
            for e in it:
                if not _COPY.match(e.name):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat()
                    out.append((st.st_mtime_ns, st.st_size, Path(e.path)))
        return out

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    @contextlib.contextmanager
    def _locked(self):
        with open(self.folder / _LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def keep(self, part: Path, final: Path, size: int) -> bool:
        """Put the complete partial file ``part`` in place as ``final``, deleting the least recently
        used copies first until everything fits; False (and ``part`` deleted) if it cannot fit."""
        if size > self.max_bytes:
            part.unlink(missing_ok=True)
            return False
        with self._locked():
            self._clean_partials()
            entries = sorted((e for e in self.entries() if e[2].name != final.name), key=lambda e: e[:2])
            total = sum(s for _, s, _ in entries)
            for _, s, path in entries:
                if total + size <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= s
                self.evicted += 1
            now = time.time_ns()
            os.utime(part, ns=(now, now))
            os.replace(part, final)
        self.kept += 1
        return True

    def _clean_partials(self) -> None:
        old = time.time() - STALE
        with os.scandir(self.folder) as it:
            for e in it:
                if _PARTIAL.match(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        if e.stat().st_mtime < old:
                            os.unlink(e.path)


class Filling:
    """The bytes of ``url`` from the store (a ``RemoteFile``, with its retries), copied into a
    partial file while the reader goes through them in order from the first byte; at the end of the
    object the copy is checked against the manifest's sha256 and handed to the cache.

    A forward seek while copying reads the bytes stepped over (the copy needs them); a seek
    anywhere else, or a seek before the first read (entering mid-file), gives the copy up and reads
    on from the store. A copy that cannot be written (a full disk) is given up the same way: the
    cache never fails a read."""

    def __init__(self, cache: ShardCache, url: str, final: Path, sha256: str | None):
        self.cache, self.url, self.final, self.sha256 = cache, url, final, sha256
        self.remote = RemoteFile(url)
        self.copying = True
        self._part: Any = None
        self._part_path: Path | None = None
        self._hash = hashlib.sha256() if sha256 else None
        self._written = 0

    # -- the byte stream ----------------------------------------------------------------------

    def read(self, n: int = -1) -> bytes:
        at = self.remote.pos
        data = self.remote.read(n)
        if self.copying:
            if at != self._written:
                self._give_up()
            elif data:
                self._write(data)
            elif n != 0:
                self._done()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.remote.pos + offset
        if self.copying and target != self.remote.pos:
            if target > self.remote.pos == self._written and self._written:
                while self.copying and self.remote.pos < target:
                    if not self.read(min(BLOCK, target - self.remote.pos)):
                        break  # the object ends first: as a seek past the end, the next read says so
                return self.remote.pos
            self._give_up()
        return self.remote.seek(target)

    def tell(self) -> int:
        return self.remote.pos

    def finish(self) -> None:
        """The reader wants nothing more: read the rest of the object into the copy (a few KiB of
        tar padding after a whole shard; the other slices, after the first slice of a cut one)."""
        try:
            while self.copying and self.read(BLOCK):
                pass
        except Exception as e:  # noqa: BLE001 (the reader has its samples: a copy not kept is no error)
            log.warning("%s: not kept in the cache (%s)", self.url, e)
            self._give_up()

    def close(self) -> None:
        if self.copying:
            self._give_up()
        self.remote.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the copy -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            if self._part is None:
                fd, name = tempfile.mkstemp(prefix=f"{PART}{self.final.name}-", dir=self.cache.folder)
                self._part, self._part_path = os.fdopen(fd, "wb"), Path(name)
            self._part.write(data)
        except OSError as e:
            log.warning("%s: not kept in the cache (%s)", self.url, e)
            self._give_up()
            return
        if self._hash is not None:
            self._hash.update(data)
        self._written += len(data)
        if self._written > self.cache.max_bytes:
            self._give_up()  # larger than the whole cache: it could never be kept

    def _done(self) -> None:
        part, path = self._part, self._part_path
        self._part, self._part_path, self.copying = None, None, False
        if part is None:
            return  # an empty object: nothing worth keeping
        try:
            part.close()
            if self._hash is not None and self._hash.hexdigest() != self.sha256:
                log.warning("%s: not kept in the cache: its sha256 differs from the manifest's", self.url)
                path.unlink(missing_ok=True)
                return
            self.cache.keep(path, self.final, self._written)
        except OSError as e:
            log.warning("%s: not kept in the cache (%s)", self.url, e)
            path.unlink(missing_ok=True)

    def _give_up(self) -> None:
        part, path = self._part, self._part_path
        self._part, self._part_path, self.copying = None, None, False
        if part is not None:
            with contextlib.suppress(OSError):
                part.close()
            path.unlink(missing_ok=True)
