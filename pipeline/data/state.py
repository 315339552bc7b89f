"""The streaming loader's position, as typed values: what a checkpoint stores and resume rewrites.

A *unit* is a contiguous run of samples of one shard, ``[start, stop)``. For each source and
epoch the shards are shuffled by ``(seed, source, epoch)`` and cut into units that are dealt to the
*streams*, one per (process, dataloader worker) — ``plan_epoch``. A stream's whole position in a
source is then a ``SourceCursor``: the units it has left of each epoch it started, how many samples
it has drawn (which seeds its next pick), and the next epoch to plan. ``LoaderState`` is one
process's position: its streams, plus what resume must check (seed, topology, shard counts).

``to_json`` / ``from_json`` give the checkpoint form (plain dicts and lists, a few KB).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.config import ConfigError
from pipeline.data.seeding import hash_int


@dataclass
class Unit:
    """Samples ``start..stop`` of shard number ``shard`` still to read; ``start`` advances."""

    shard: int
    start: int
    stop: int

    @property
    def left(self) -> int:
        return self.stop - self.start

    def clone(self) -> Unit:
        return Unit(self.shard, self.start, self.stop)


@dataclass
class Segment:
    """The units one stream has left of one epoch."""

    epoch: int
    units: list[Unit]

    def clone(self) -> Segment:
        return Segment(self.epoch, [u.clone() for u in self.units])


@dataclass
class SourceCursor:
    """Where one stream stands in one source."""

    #: samples drawn so far; the next pick among the open units is a hash of it
    picks: int = 0
    #: epochs started and not finished, oldest first
    segments: list[Segment] = field(default_factory=list)
    #: the next epoch to plan once ``segments`` is empty
    next_epoch: int = 0
    #: samples skipped (``on_error: skip``)
    skipped: int = 0

    def clone(self) -> SourceCursor:
        return SourceCursor(self.picks, [s.clone() for s in self.segments], self.next_epoch, self.skipped)

    @property
    def first_epoch(self) -> int:
        """The oldest epoch this stream has not finished."""
        return self.segments[0].epoch if self.segments else self.next_epoch


@dataclass
class StreamState:
    """One stream's position: its next rank-level batch index and a cursor per source."""

    batch: int
    sources: dict[str, SourceCursor]

    def clone(self) -> StreamState:
        return StreamState(self.batch, {n: c.clone() for n, c in self.sources.items()})

    @classmethod
    def fresh(cls, batch: int, sources: Sequence[str]) -> StreamState:
        """A stream that has produced nothing: epoch 0 is planned when it is first read."""
        return cls(batch, {s: SourceCursor() for s in sources})


@dataclass
class LoaderState:
    """One process's position: every one of its streams, as consumed by the training loop."""

    VERSION: ClassVar[int] = 2

    seed: int
    rank: int
    world_size: int
    workers_per_rank: int
    #: sample count of every shard, per source: resume needs the same shards
    counts: dict[str, list[int]]
    #: stream id (rank * workers_per_rank + worker) → position
    streams: dict[int, StreamState]
    #: the local worker whose batch comes next
    rotation: int = 0
    #: batches handed out by this process
    batches: int = 0
    skipped: int = 0

    def to_json(self) -> dict:
        return {
            "version": self.VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank, "rotation": self.rotation, "batches": self.batches,
            "skipped": self.skipped, "counts": self.counts,
            "streams": {str(k): _stream_json(s) for k, s in self.streams.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> LoaderState:
        version = data.get("version") if isinstance(data, dict) else None
        if version != cls.VERSION:
            raise ConfigError(f"data position: loader state version {version}, this pipeline reads version "
                              f"{cls.VERSION} (saved by another version of the pipeline?)")
        try:
            return cls(
                seed=data["seed"], rank=data["rank"], world_size=data["world_size"],
                workers_per_rank=data["workers_per_rank"], counts={n: list(c) for n, c in data["counts"].items()},
                streams={int(k): _stream_from(s) for k, s in data["streams"].items()},
                rotation=data["rotation"], batches=data["batches"], skipped=data["skipped"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"data position: malformed loader state ({type(e).__name__}: {e})") from None


def _stream_json(s: StreamState) -> dict:
    return {"batch": s.batch, "sources": {
        n: {"picks": c.picks, "next_epoch": c.next_epoch, "skipped": c.skipped,
            "segments": [[g.epoch, [[u.shard, u.start, u.stop] for u in g.units]] for g in c.segments]}
        for n, c in s.sources.items()}}


def _stream_from(d: dict) -> StreamState:
    return StreamState(d["batch"], {
        n: SourceCursor(c["picks"], [Segment(e, [Unit(*u) for u in us]) for e, us in c["segments"]],
                        c["next_epoch"], c["skipped"])
        for n, c in d["sources"].items()})


def plan_epoch(counts: Sequence[int], seed: int, source: str, epoch: int, n_streams: int) -> list[list[Unit]]:
    """Units dealt to each of ``n_streams`` streams for one epoch of a source whose shards hold
    ``counts`` samples. A pure function: every process plans every epoch identically."""
    order = list(range(len(counts)))
    random.Random(hash_int(seed, "order", source, epoch)).shuffle(order)
    pieces = max(1, math.ceil(n_streams / max(1, len(counts))))
    units = []
    for i in order:
        cuts = [counts[i] * p // pieces for p in range(pieces + 1)]
        units += [Unit(i, a, b) for a, b in itertools.pairwise(cuts) if b > a]
    return [units[s::n_streams] for s in range(n_streams)]
