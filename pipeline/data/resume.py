"""Restoring a ``StreamingLoader`` from the saved positions of every process of an earlier run.

Same topology (processes × workers): each stream continues from its own state and the remaining
sample sequence equals the uninterrupted one. Another topology: the units left in every epoch any
stream had started are pooled, in a fixed order, and dealt to the new streams; later epochs are
planned for the new topology. Both keep the invariant that matters: over each epoch every sample
is consumed exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.data.loader import StreamingLoader


def restore(loader: "StreamingLoader", states: list[dict]) -> None:
    _check(loader, states)
    old = {int(k): v for st in states for k, v in st["streams"].items()}
    old_world, old_workers = states[0]["world_size"], states[0]["workers_per_rank"]
    batches = max(st["batches"] for st in states)
    loader.batches = batches
    loader.skipped = sum(st["skipped"] for st in states) if loader.rank == 0 else 0
    if (old_world, old_workers) == (loader.world_size, loader.workers_per_rank):
        mine = [st for st in states if st["rank"] == loader.rank][0]
        loader.stream_states = {int(k): v for k, v in mine["streams"].items()}
        loader.rotation = mine["rotation"]
        loader.batches = mine["batches"]
    else:
        loader.stream_states = _redistribute(loader, old, old_world * old_workers, batches)
        loader.rotation = 0
    if loader.cfg.ledger:
        _truncate_ledger(Path(loader.cfg.ledger), states, loader.rank, loader.world_size)


def _check(loader: "StreamingLoader", states: list[dict]) -> None:
    if not states or any(st.get("version") != 1 for st in states):
        raise ConfigError("data position: not a loader state (version 1) — was it saved by this pipeline?")
    ranks = sorted(st["rank"] for st in states)
    if ranks != list(range(states[0]["world_size"])):
        raise ConfigError(f"data position: holds ranks {ranks}, expected all of 0..{states[0]['world_size'] - 1}")
    if states[0]["seed"] != loader.seed:
        raise ConfigError(f"data position: saved with seed {states[0]['seed']}, resuming with seed {loader.seed}")
    now = {n: [s.count for s in ss.shards] for n, ss in loader.shardsets.items()}
    if states[0]["sources"] != now:
        changed = sorted(set(now) ^ set(states[0]["sources"])) or [n for n in now if now[n] != states[0]["sources"].get(n)]
        raise ConfigError(f"data position: source(s) {', '.join(changed)} changed since the position was saved; "
                          "resume needs the same shards")


def _redistribute(loader: "StreamingLoader", old: dict[int, dict], old_streams: int, batches: int) -> dict[int, dict]:
    new_ids = [loader.rank * loader.workers_per_rank + w for w in range(loader.workers_per_rank)]
    new_states = {
        sid: {"k": batches + w, "sources": {}} for w, sid in enumerate(new_ids)
    }
    for name in loader.sources:
        plan_old = loader.planner(name, old_streams)
        subs = [old[s]["sources"][name] for s in range(old_streams)]
        lo = min(s["segments"][0][0] if s["segments"] else s["next_epoch"] for s in subs)
        hi = max(s["next_epoch"] for s in subs)
        leftovers = {e: _leftover(e, subs, plan_old) for e in range(lo, hi)}
        for sid, st in new_states.items():
            st["sources"][name] = {
                "n": 0,
                "segments": [[e, units[sid :: loader.n_streams]] for e, units in leftovers.items()],
                "next_epoch": hi,
                "skipped": 0,
            }
    return new_states


def _leftover(epoch: int, subs: list[dict], plan_old) -> list[list[int]]:
    """Units of ``epoch`` not yet consumed by any old stream, in old-stream order."""
    units, planned = [], None
    for s, sub in enumerate(subs):
        if epoch < sub["next_epoch"]:
            units += [list(u) for e, us in sub["segments"] if e == epoch for u in us]
        else:  # this stream had not reached ``epoch``: all of its share is left
            planned = planned or plan_old(epoch)
            units += [list(u) for u in planned[s]]
    return units


def _truncate_ledger(folder: Path, states: list[dict], rank: int, world: int) -> None:
    """Drop ledger lines of batches consumed after the saved position (they will be replayed).
    New rank r tidies the files of old ranks r, r + world, … so no two processes touch one file."""
    for st in states:
        if st["rank"] % world != rank:
            continue
        path = folder / f"rank{st['rank']:05d}.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["batch"] < st["batches"]]
            path.write_text("".join(ln + "\n" for ln in keep))
