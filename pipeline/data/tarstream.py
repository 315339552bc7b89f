"""Reading tar members fast: the byte-level half of a shard reader (``pipeline.data.shards`` groups
the members into webdataset samples).

Shards hold many small members, so the cost of reading one is per member, not per byte: the file
is read (and inflated, for ``.tar.gz``) in large chunks and headers are parsed straight out of the
buffer. USTAR, GNU long names and PAX paths are understood; header checksums are verified.
"""

from __future__ import annotations

import struct
import zlib


class TarError(ValueError):
    """The bytes are not a well-formed tar (the message says how: truncated, corrupt header …)."""


def split_member(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): the key ends at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


# Compressed (or plain) bytes taken from the file per read, and the most decoded bytes one inflate
# step may produce (a bound on memory for highly compressible members).
_READ = 1 << 18
_INFLATE = 1 << 22
_GZIP = 16 + zlib.MAX_WBITS


class TarStream:
    """Sequential reader of tar members (USTAR, GNU long names, PAX paths), with header checksums.

    Shards hold many small members (a 28×28 PNG, a label, some JSON), so the cost is per member,
    not per byte. The file is therefore read (and inflated, for ``.tar.gz``) in large chunks into
    one buffer and headers are parsed straight out of it; ``tarfile`` or one ``read`` call per
    header through ``gzip.GzipFile`` would cost tens of microseconds per member. Only name, size
    and type are parsed. Members the caller does not want are stepped over in the buffer."""

    def __init__(self, path: str, on_other=None, start: int = 0, raw=None):
        from pipeline.data.remote import open_bytes

        self.path = path
        #: called with (name, kind) for each member that is neither a file nor a folder (links,
        #: devices, fifos): readers step over them, a checker reports them
        self.on_other = on_other
        # closed by close(): a local file, a URL, a pipe: command, or the stream ``raw`` opened for ``path``
        self.raw = open_bytes(path) if raw is None else raw
        if start:  # a byte offset from the manifest: only an uncompressed tar can be entered there
            self.raw.seek(start)
            self.gz = None
        else:
            magic = self.raw.read(2)
            self.gz = zlib.decompressobj(_GZIP) if magic == b"\x1f\x8b" else None
            self.pending = magic  # handed to the first chunk: a pipe: stream cannot seek back
        if start:
            self.pending = b""  # compressed bytes after the end of one gzip member (concatenated .gz)
        self.buf = b""
        self.pos = 0
        #: tar-stream offset of ``buf[0]`` (uncompressed bytes), so ``tell`` knows where a member starts
        self.base = start
        #: offset of the first header block of the member ``next_member`` returned last
        self.member_start = start

    @property
    def compressed(self) -> bool:
        return self.gz is not None

    def tell(self) -> int:
        return self.base + self.pos

    def close(self) -> None:
        self.raw.close()

    def finish(self) -> None:
        """The reader is done with this shard: a stream that keeps a local copy of it
        (``pipeline.data.cache``) reads the rest of the file into the copy; others do nothing."""
        finish = getattr(self.raw, "finish", None)
        if finish is not None:
            finish()

    def _next_chunk(self) -> bytes:
        """The next piece of the tar byte stream; b"" at the end of the file."""
        if self.gz is None:
            head, self.pending = self.pending, b""
            return head + self.raw.read(_READ - len(head))
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
        self.base += self.pos
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
            raise TarError("truncated")
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
        target = self.base + self.pos + n
        n -= have
        self.buf, self.pos, self.base = b"", 0, target
        if self.gz is None:
            if self.pending:
                n -= len(self.pending)
                self.pending = b""
            self.raw.seek(n, 1)  # a short file shows up as a truncated next header (a URL: a range request)
            return
        while n:
            chunk = self._next_chunk()
            if not chunk:
                raise TarError("truncated")
            if len(chunk) > n:
                self.buf, self.pos, self.base = chunk, n, target - n
                return
            n -= len(chunk)

    def next_member(self) -> tuple[str, int] | None:
        """(name, size) of the next regular file, positioned at its data, which must be ``read``
        or ``skip``-ped before asking for the next member; None at the end-of-archive marker."""
        long_name = None
        self.member_start = self.tell()
        while True:
            if len(self.buf) - self.pos < 512 and not self._ensure(512):
                raise TarError("truncated (no end-of-archive marker)")
            buf, p = self.buf, self.pos
            self.pos = p + 512
            # Adler-32's low half is 1 + (byte sum mod 65521), and 256 bytes sum to at most 65280:
            # two halves give the header's exact byte sum from C code, far cheaper than sum()
            total = (zlib.adler32(buf[p:p + 256]) & 0xFFFF) + (zlib.adler32(buf[p + 256:p + 512]) & 0xFFFF) - 2
            if total == 0:  # an all-zero block ends the archive
                return None
            name, size, checksum, kind, magic, prefix = _HEADER.unpack_from(buf, p)
            if total - sum(checksum) + 256 != _octal(checksum):
                raise TarError("corrupt tar header (checksum mismatch)")
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
                if self.on_other is not None and kind in _SPECIAL:
                    self.on_other(name, _SPECIAL[kind])
                self.skip(size)
                continue
            return name, size


#: the header fields read: name, size, checksum, type, magic (without its terminator), prefix
_HEADER = struct.Struct("100s24x12s12x8sc100x5s83x155s12x")
_NAME_RECORDS = (b"L", b"x")
_REGULAR = (b"0", b"\0", b"7")
#: members that are neither files nor folders (nor pax/GNU metadata)
_SPECIAL = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device", b"6": "fifo"}


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
