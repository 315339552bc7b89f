"""Paths the pipeline derives from names (shard prefixes, sample keys, field names, manifest
entries, jsonl media paths, …) stay inside their parent: a name that would leave it is a
``ConfigError`` before anything is read, written or deleted.

The check is lexical: an absolute name, a ``..`` component, a backslash or a NUL is refused. A
symlink that a user placed inside the parent is theirs to follow.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from pipeline.config import ConfigError


def inside(parent: str | Path, name: str | Path, what: str) -> Path:
    """``parent / name``, or a one-line ``ConfigError`` naming ``what`` when ``name`` would leave ``parent``."""
    problem = escape(str(name))
    if problem:
        raise ConfigError(f"{what}: {str(name)!r} {problem}; it must stay inside {parent}")
    return Path(parent) / name


def escape(name: str) -> str | None:
    """Why the relative name ``name`` would not stay inside the folder it is joined to; None if it would."""
    if not name:
        return "is empty"
    if "\0" in name:
        return "holds a NUL character"
    if "\\" in name:
        return "holds a backslash (a path separator on Windows)"
    if posixpath.isabs(name):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "holds a '..' component"
    return None


def member_name(key: str, ext: str, where: str) -> None:
    """Check that the tar member ``<key>.<ext>`` of a sample stays inside the shard's root when
    extracted (``tarfile.extractall``, ``tar -x``): keys may hold ``/`` (subfolders), extensions may not."""
    problem = escape(key)
    if problem is None and key.endswith("/"):
        problem = "ends with '/'"
    if problem:
        raise ConfigError(f"{where}: sample key {key!r} {problem}; tar member names must stay inside the shard")
    if not ext or "/" in ext or escape(ext):
        raise ConfigError(f"{where}: sample {key!r}: field {ext!r} cannot be a tar member suffix "
                          "(empty, or holds a path separator, '..' or NUL)")
