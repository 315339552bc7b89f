"""Resume as a pure function: the saved positions of every process of an earlier run and the new
topology → the position one new process starts from.

Same topology (processes × workers): each stream continues from its own state and the remaining
sample sequence equals the uninterrupted one. Another topology: the units left in every epoch any
stream had started are pooled, in a fixed order, and dealt to the new streams; later epochs are
planned for the new topology. Both keep the invariant that matters: over each epoch every sample
is consumed exactly once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pipeline.config import ConfigError
from pipeline.data.state import LoaderState, Segment, SourceCursor, StreamState, Unit, plan_epoch


@dataclass(frozen=True)
class Topology:
    """Who the resuming process is, and what it reads."""

    rank: int
    world_size: int
    workers_per_rank: int
    seed: int
    #: sample count of every shard, per source, as the shards are now
    counts: dict[str, list[int]]

    @property
    def n_streams(self) -> int:
        return self.world_size * self.workers_per_rank


def resume(old: list[LoaderState], new: Topology) -> LoaderState:
    """The state process ``new.rank`` continues from, given every old process's state."""
    check(old, new)
    batches = max(st.batches for st in old)
    skipped = sum(st.skipped for st in old) if new.rank == 0 else 0
    if (old[0].world_size, old[0].workers_per_rank) == (new.world_size, new.workers_per_rank):
        mine = next(st for st in old if st.rank == new.rank)
        streams = {k: s.clone() for k, s in mine.streams.items()}
        return LoaderState(new.seed, new.rank, new.world_size, new.workers_per_rank, new.counts, streams,
                           rotation=mine.rotation, batches=mine.batches, skipped=skipped)
    streams = redistribute({k: s for st in old for k, s in st.streams.items()},
                           old[0].world_size * old[0].workers_per_rank, new, batches)
    return LoaderState(new.seed, new.rank, new.world_size, new.workers_per_rank, new.counts, streams,
                       rotation=0, batches=batches, skipped=skipped)


def check(old: list[LoaderState], new: Topology) -> None:
    """One-line errors for positions this process cannot continue from."""
    if not old:
        raise ConfigError("data position: no loader state given")
    world = old[0].world_size
    ranks = sorted(st.rank for st in old)
    if ranks != list(range(world)) or any(st.world_size != world for st in old):
        raise ConfigError(f"data position: holds ranks {ranks}, expected all of 0..{world - 1}")
    if old[0].seed != new.seed:
        raise ConfigError(f"data position: saved with seed {old[0].seed}, resuming with seed {new.seed}")
    saved = old[0].counts
    if saved != new.counts:
        changed = sorted(set(new.counts) ^ set(saved)) or [n for n in new.counts if new.counts[n] != saved.get(n)]
        raise ConfigError(f"data position: source(s) {', '.join(changed)} changed since the position was saved; "
                          "resume needs the same shards")


def redistribute(old: dict[int, StreamState], old_streams: int, new: Topology, batches: int) -> dict[int, StreamState]:
    """The new streams of ``new.rank``: each started epoch's leftover units, dealt round-robin."""
    ids = [new.rank * new.workers_per_rank + w for w in range(new.workers_per_rank)]
    streams = {sid: StreamState(batches + w, {}) for w, sid in enumerate(ids)}
    for name, counts in new.counts.items():
        cursors = [old[s].sources[name] for s in range(old_streams)]
        lo = min(c.first_epoch for c in cursors)
        hi = max(c.next_epoch for c in cursors)
        plan_old = functools.partial(plan_epoch, counts, new.seed, name, n_streams=old_streams)
        leftovers = {e: leftover(e, cursors, plan_old) for e in range(lo, hi)}
        for sid, st in streams.items():
            segments = [Segment(e, [u.clone() for u in units[sid::new.n_streams]]) for e, units in leftovers.items()]
            st.sources[name] = SourceCursor(0, segments, hi, 0)
    return streams


def leftover(epoch: int, cursors: list[SourceCursor], plan_old) -> list[Unit]:
    """Units of ``epoch`` not yet consumed by any old stream, in old-stream order."""
    units, planned = [], None
    for s, cursor in enumerate(cursors):
        if epoch < cursor.next_epoch:
            units += [u for seg in cursor.segments if seg.epoch == epoch for u in seg.units]
        else:  # this stream had not reached ``epoch``: all of its share is left
            planned = planned or plan_old(epoch=epoch)
            units += planned[s]
    return units
