"""One writer per directory: the lock a command holds on a run directory or a shard output folder.

``hold(dir)`` creates ``dir/.selfsup.lock`` atomically (``O_CREAT | O_EXCL``) holding who took it:
host, pid, command line and since when. A second command on the same directory is refused with
one line naming the holder. A lock left by a process that is gone (killed, say) on this host is
taken over with a notice; one held from another host is only broken on request
(``break_lock=True``, ``--break-lock``), since this host cannot tell whether that process lives.

The processes of one ``accelerate launch`` share their launch's lock: process 0 takes it, and the
others write nothing that needs one (the runner leaves a directory's bookkeeping to process 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import ConfigError

log = logging.getLogger("selfsup")
NAME = ".selfsup.lock"


class LockedError(ConfigError):
    """Another command holds the directory."""


@contextlib.contextmanager
def hold(directory: str | Path, break_lock: bool = False) -> Iterator[Path]:
    """Hold ``directory``'s lock for the ``with`` block (the directory is created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)[:300], "since": time.time()}
    holder = _holder(path)
    if holder and (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
        yield path  # this process holds it already (a stage inside a command that locked its folder)
        return
    _take(path, me, break_lock)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


def _take(path: Path, me: dict, break_lock: bool) -> None:
    for _ in range(3):  # a stale lock removed by a racing process: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue
            if not (break_lock or _gone(holder)):
                raise LockedError(f"{path.parent}: in use by {_describe(holder)}; wait for it to finish"
                                  f"{'' if holder.get('host') == me['host'] else ', or pass --break-lock if it is gone'}")
            log.warning("%s: taking over the lock of %s (%s)", path.parent, _describe(holder),
                        "broken on request" if break_lock else "that process is gone")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise LockedError(f"{path.parent}: could not take the lock {path}")


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "command": "unreadable lock file", "since": path.stat().st_mtime}


def _gone(holder: dict) -> bool:
    """The holder is a process of this host that no longer runs."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since} ({holder.get('command')})"
