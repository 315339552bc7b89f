"""Shard bytes behind URLs: ``s3://``, ``http(s)://`` and any other fsspec protocol, and
webdataset's ``pipe:COMMAND``.

Readers see one small byte-stream interface (``read``, ``seek``, ``close``) whatever the source, so
``TarStream`` and the loader stay the same for a local file and an object in a bucket. A remote
stream keeps its own byte position: when a read fails with a transient fault (connection reset,
5xx, timeout) it reopens the object at exactly that byte, after a growing pause, so no sample is
dropped or read twice. Seeking forward is a range request on fsspec stores; on a ``pipe:`` stream it
reads and discards the bytes (``skipped_bytes`` counts them), and a retry restarts the command.

Credentials and endpoints come from the usual places only: the store's own environment and config
files (``AWS_ENDPOINT_URL``, ``~/.aws``, …) or ``storage_options`` given to ``set_storage_options``;
``redact`` hides secrets before anything is written to a run directory or a log.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

#: a URL: a scheme of two or more letters (so a Windows drive letter is not one), then ``://``
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+(::[A-Za-z][A-Za-z0-9+.-]+)*://")
PIPE = "pipe:"
#: bytes asked of the store per request; the tar reader asks in 256 KiB pieces
BLOCK = 1 << 22

#: attempts after the first failed read of one stream, and the first pause (doubled each time)
RETRIES = 6
BACKOFF = 0.1

_OPTIONS: dict[str, dict[str, Any]] = {}


def is_url(spec: Any) -> bool:
    """True for ``proto://…`` and ``pipe:…`` specs (anything not a local path)."""
    return isinstance(spec, str) and (bool(_URL.match(spec)) or spec.startswith(PIPE))


def set_storage_options(options: dict[str, dict[str, Any]] | None) -> None:
    """fsspec filesystem arguments per protocol (``{"s3": {"endpoint_url": …}}``), for this process
    and the dataloader workers it forks. Unset protocols use the store's own environment and config."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``."""
    import fsspec

    proto = url.split("://", 1)[0]
    if "::" in proto:  # a chain such as filecache::s3://…: each layer takes the options named after it
        return fsspec.core.url_to_fs(url, **_OPTIONS)
    options = _OPTIONS.get(proto, {})
    if proto in ("s3", "s3a") and "session" not in options:
        options = _with_aws_session(options)
    return fsspec.core.url_to_fs(url, **options)


#: the botocore data loader (service models parsed from their JSON files) of the first S3 session
#: made in this process tree, and this process's sessions by their arguments
_AWS_LOADER: list[Any] = []
_AWS_SESSIONS: dict[tuple, Any] = {}
_AWS_LOCK = threading.Lock()


@functools.cache
def _s3fs_arguments() -> frozenset[str]:
    import inspect

    import s3fs

    named = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters)
    return frozenset(named | {"use_listings_cache", "listings_expiry_time", "max_paths"})  # s3fs hands these on


def _with_aws_session(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs ``options`` with the aiobotocore session it would make itself, except that every session
    shares one botocore data loader. A dataloader worker is a fresh process whose first S3 client
    would parse the service models again: about 0.1 s of CPU per worker, and workers start anew
    with every pass over the data. Forked workers inherit the loader already filled by the main
    process; credentials, config and connections stay each process's own."""
    import aiobotocore.session

    named = _s3fs_arguments()
    own = {k: v for k, v in options.items() if k not in named}  # what s3fs passes to AioSession
    key = (os.getpid(), repr(sorted(own.items())))
    with _AWS_LOCK:
        session = _AWS_SESSIONS.get(key)
        if session is None:
            session = _AWS_SESSIONS[key] = aiobotocore.session.AioSession(**own)
            if _AWS_LOADER:
                session.register_component("data_loader", _AWS_LOADER[0])
            else:
                _AWS_LOADER.append(session.get_component("data_loader"))
    return {**{k: v for k, v in options.items() if k in named}, "session": session}


SECRET = re.compile(r"secret|token|password|passwd|credential|key$|^key|signature|session", re.IGNORECASE)


def redact(value: Any) -> Any:
    """``value`` with every mapping entry whose name looks secret replaced by ``"***"``, and any
    ``user:password@`` in URLs hidden: what may be written to a run directory or a log."""
    if isinstance(value, dict):
        return {k: "***" if isinstance(k, str) and SECRET.search(k) and v not in (None, "") else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and _URL.match(value):
        return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+://)[^/@]*@", r"\1***@", value)
    return value


def _transient() -> tuple[type[BaseException], ...]:
    """Exception types worth a retry: network faults, 5xx answers, timeouts (not 'no such object')."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, asyncio.TimeoutError, OSError]
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(kinds)


class _PipeFailed(OSError):
    """A ``pipe:`` command that ended with an error status (its stderr went to the terminal)."""


def _permanent(e: BaseException) -> bool:
    if isinstance(e, _PipeFailed):
        return True
    status = getattr(e, "status", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return True
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError))


class RemoteFile:
    """Read-only bytes of one URL or ``pipe:`` command, resumed at the exact byte after a fault."""

    def __init__(self, url: str, retries: int | None = None, backoff: float | None = None):
        self.url = url
        self.pos = 0
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF if backoff is None else backoff
        #: reconnections after faults, and bytes read only to be thrown away (pipe: seeks)
        self.retried = 0
        self.skipped_bytes = 0
        self._f: Any = None
        self._proc: subprocess.Popen | None = None
        self._at = 0  # where the open handle stands (a pipe cannot seek)

    # -- opening ------------------------------------------------------------------------------

    def _open(self) -> None:
        if self.url.startswith(PIPE):
            self._proc = subprocess.Popen(self.url[len(PIPE):], shell=True, stdout=subprocess.PIPE)
            self._f, self._at = self._proc.stdout, 0
            return
        fs, path = filesystem(self.url)
        self._f = fs.open(path, "rb", block_size=BLOCK, cache_type="readahead")
        self._f.seek(self.pos)
        self._at = self.pos

    def close(self) -> None:
        f, proc, self._f, self._proc = self._f, self._proc, None, None
        if f is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; nothing is lost
                f.close()
        if proc is not None:
            proc.kill()
            proc.wait()

    # -- reading ------------------------------------------------------------------------------

    def read(self, n: int = -1) -> bytes:
        transient = _transient()
        for attempt in range(self.retries + 1):
            try:
                if self._f is None:
                    self._open()
                if self._proc is not None and self._at < self.pos:
                    self._discard(self.pos - self._at)
                data = self._f.read(n)
                if self._proc is not None and not data and n != 0 and self._proc.wait() != 0:
                    raise _PipeFailed(f"command exited with status {self._proc.returncode}")
                self.pos += len(data)
                self._at = self.pos
                return data
            except transient as e:
                self.close()
                if _permanent(e) or attempt == self.retries:
                    raise OSError(f"{self.url}: {type(e).__name__}: {e}"
                                  + (f" (after {attempt} retries)" if attempt else "")) from None
                self.retried += 1
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _discard(self, n: int) -> None:
        while n > 0:
            got = self._f.read(min(n, BLOCK))
            if not got:
                raise OSError("stream ended early")
            n -= len(got)
            self._at += len(got)
            self.skipped_bytes += len(got)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset
        if self._f is not None and self._proc is None:
            self._f.seek(self.pos)
            self._at = self.pos
        elif self._proc is not None and self.pos < self._at:
            self.close()  # a pipe only goes forward: start the command again
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bytes(path: str):
    """A readable binary stream for a local path or a URL (the caller closes it)."""
    return RemoteFile(path) if is_url(path) else open(path, "rb")


def exists(path: str) -> bool:
    if path.startswith(PIPE):
        return True
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    try:
        return bool(fs.exists(inner))
    except _transient():
        return False


def read_text(path: str) -> str:
    with open_bytes(path) as f:
        return f.read().decode()


def join(base: str, name: str) -> str:
    """``name`` relative to the folder of the URL ``base``."""
    return f"{base.rsplit('/', 1)[0]}/{name}"


def fingerprint(url: str) -> str:
    """What identifies a remote input without downloading it: a manifest's bytes; for other
    objects the store's size and tag (ETag, mtime); for ``pipe:`` the command itself."""
    import hashlib
    import json

    if url.startswith(PIPE):
        return hashlib.sha256(url.encode()).hexdigest()
    if url.endswith(".json"):
        return hashlib.sha256(read_text(url).encode()).hexdigest()
    fs, inner = filesystem(url)
    try:
        info = fs.info(inner)
    except FileNotFoundError:
        return "missing"
    keep = {k: str(v) for k, v in info.items() if k in ("size", "ETag", "etag", "LastModified", "mtime")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def read_ahead(samples: Iterator[dict], depth: int) -> Iterator[dict]:
    """``samples`` read by a background thread up to ``depth`` samples ahead of the consumer: the
    next bytes of a remote shard arrive while the current batch is decoded. Order and content are
    unchanged (the loader's position counts what the consumer took); an error reaches the consumer
    at the sample where it happened.

    The reader refills in bursts: once ``depth`` samples wait, it sleeps until the consumer has
    taken half of them. Handing over one sample per wake-up (a plain bounded queue) makes the two
    threads trade the interpreter lock for every sample, which on loopback stores cost more than
    the read-ahead saved."""
    buf: collections.deque = collections.deque()
    cond = threading.Condition()
    low = depth // 2
    end: list[BaseException | None] = []  # set once by the reader: [None] at the end, [error] on a fault
    stop = False

    def pump() -> None:
        error = None
        try:
            for sample in samples:
                with cond:
                    while len(buf) >= depth and not stop:
                        cond.wait(0.5)
                    if stop:
                        break
                    buf.append(sample)
                    if len(buf) == 1:
                        cond.notify()  # the consumer may be waiting for it
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, who raises it)
            error = e
        finally:
            with cond:
                end.append(error)
                cond.notify()
            close = getattr(samples, "close", None)
            if stop and close is not None:
                close()

    thread = threading.Thread(target=pump, daemon=True, name="read-ahead")
    thread.start()
    try:
        while True:
            with cond:
                while not buf and not end:
                    cond.wait()
                if not buf:
                    if end[0] is not None:
                        raise end[0]
                    return
                sample = buf.popleft()
                if len(buf) == low:
                    cond.notify()  # the reader may be waiting for room
            yield sample
    finally:
        with cond:
            stop = True
            cond.notify()


def upload(folder, url: str, names: list[str]) -> None:
    """Copy the shards ``names`` and then ``manifest.json`` from ``folder`` to the folder URL ``url``:
    a reader that finds the new manifest finds every shard it lists."""
    if url.startswith(PIPE):
        raise OSError(f"{url}: a pipe: command cannot be written to")
    fs, inner = filesystem(url)
    for name in [*names, "manifest.json"]:
        fs.put_file(f"{folder}/{name}", f"{inner}/{name}")
