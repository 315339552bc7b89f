"""The loader's ledger: one jsonl per process, ``{"batch": n, "keys": [...]}`` per consumed batch,
for audits and tests. On resume, lines of batches consumed after the saved position are dropped,
since those batches are replayed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from pipeline.data.state import LoaderState


def ledger_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank:05d}.jsonl"


def open_ledger(folder: str | Path, rank: int) -> IO[str]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return open(ledger_path(folder, rank), "a")  # closed by the loader's iterator


def truncate_ledger(folder: str | Path, old: list[LoaderState], rank: int, world: int) -> None:
    """Drop ledger lines of batches consumed after the saved positions ``old``.
    New rank r tidies the files of old ranks r, r + world, … so no two processes touch one file."""
    for st in old:
        if st.rank % world != rank:
            continue
        path = ledger_path(folder, st.rank)
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["batch"] < st.batches]
            path.write_text("".join(ln + "\n" for ln in keep))
