"""Streaming loader over webdataset shards with exact, elastic resume.

The global order is a pure function of the seed. For each source and epoch, shards are shuffled by
``(seed, source, epoch)`` and cut into *units* (a whole shard, or a slice of one when there are
fewer shards than streams). Units are dealt round-robin to the *streams*:
one per (process, dataloader worker). A stream reads ``interleave`` units at once and picks the
next sample among them by a hash of (seed, stream, sample count), so no shuffle buffer is needed
and the stream's whole position is a short list of units with their cursors. The settings live in
``pipeline.data.settings``, the position types in ``pipeline.data.state``, and resuming from them
is the pure function ``pipeline.data.resume``.

Every batch travels from its worker with the state of its stream *after* that batch. The main
process keeps the state of the last batch it handed out per stream, so ``state_dict()`` describes
exactly what was consumed, never what was prefetched. Resuming with the same topology restarts each
stream from its state (the remaining sequence is identical); resuming with another number of
processes or workers pools the leftover units of every started epoch and deals them to the new
streams, so over an epoch no sample is seen twice and none is dropped.

Augmentation randomness is seeded by (seed, epoch, sample key) only, and the source of each batch
by (seed, batch index), identical on every process, so mixtures keep ranks in step.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modalities.base import Modality
from pipeline import registry
from pipeline.config import ConfigError
from pipeline.data.cache import ShardCache
from pipeline.data.ledger import open_ledger, truncate_ledger
from pipeline.data.remote import is_url, read_ahead, set_storage_options
from pipeline.data.resume import Topology, resume
from pipeline.data.seeding import hash_int, sample_rng
from pipeline.data.settings import CacheConfig, LoaderConfig, SampleError, SourceConfig
from pipeline.data.shards import ShardError, ShardSet, iter_samples, open_shards
from pipeline.data.state import LoaderState, Segment, SourceCursor, StreamState, Unit, plan_epoch

__all__ = ["CacheConfig", "LoaderConfig", "SampleError", "SourceConfig", "StreamingLoader", "prepare_sample",
           "to_device"]

log = logging.getLogger(__name__)


class _SourceReader:
    """The sample sequence of one source within one stream; advances ``cursor`` as it reads."""

    def __init__(self, name: str, src: SourceConfig, shards: ShardSet, cursor: SourceCursor, plan, stream: int,
                 cfg: LoaderConfig, seed: int, exts: frozenset[str] | None = None, cache: ShardCache | None = None):
        self.name, self.src, self.shards, self.cursor, self.plan = name, src, shards, cursor, plan
        self.stream, self.cfg, self.seed, self.exts, self.cache = stream, cfg, seed, exts, cache
        self._open: dict[tuple, Iterator] = {}
        #: (samples, reason) skipped since the last batch, reported with it
        self.skips: list[tuple[int, str]] = []

    def next(self) -> tuple[int, str, dict] | None:
        """(epoch, shard path, raw sample), or None when the epoch budget is spent."""
        cur = self.cursor
        while True:
            if not cur.segments:
                if self.cfg.epochs is not None and cur.next_epoch >= self.cfg.epochs:
                    return None
                cur.segments.append(Segment(cur.next_epoch, self.plan(cur.next_epoch)[self.stream]))
                cur.next_epoch += 1
            seg = cur.segments[0]
            if not seg.units:
                cur.segments.pop(0)
                continue
            window = min(len(seg.units), self.cfg.interleave)
            j = hash_int(self.seed, "pick", self.name, self.stream, cur.picks) % window
            unit = seg.units[j]
            cur.picks += 1
            try:
                sample = self._read(seg.epoch, unit)
            except ShardError as e:
                if self.cfg.on_error == "raise":
                    raise
                cur.skipped += unit.left
                self.skips.append((unit.left, f"{e} (rest of the shard skipped)"))
                seg.units.pop(j)
                continue
            unit.start += 1
            if unit.start >= unit.stop:
                seg.units.pop(j)
                self._open.pop((seg.epoch, unit.shard, unit.stop), None)
            path = self.shards.shards[unit.shard].path
            try:
                if not self.src.wanted(sample):  # the other part of a held-out split: not read
                    continue
            except SampleError as e:
                if self.cfg.on_error == "raise":
                    raise SampleError(f"{path}: {e}") from None
                self.skips.append((1, f"{path}: {e}"))
                continue
            return seg.epoch, path, sample

    def _read(self, epoch: int, unit: Unit) -> dict:
        key = (epoch, unit.shard, unit.stop)
        it = self._open.get(key)
        if it is None:
            shard = self.shards.shards[unit.shard]
            it = iter_samples(shard.path, unit.start, unit.stop, self.exts, offsets=shard.offsets, cache=self.cache,
                              sha256=shard.sha256)
            if self.cfg.read_ahead and is_url(shard.path):
                it = read_ahead(it, self.cfg.read_ahead)
            self._open[key] = it
        sample = next(it, None)
        if sample is None:
            self._open.pop(key, None)
            s = self.shards.shards[unit.shard]
            raise ShardError(f"{s.path}: ended at sample {unit.start}, but the manifest promises {s.count}")
        return sample


class StreamingDataset(IterableDataset):
    """Runs inside each dataloader worker: reads this worker's stream, decodes, augments, batches."""

    def __init__(self, loader: StreamingLoader):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (ld.position.rotation + worker) % ld.workers_per_rank
        stream = ld.rank * ld.workers_per_rank + local
        state = ld.position.streams[stream].clone()
        mods = {m: registry.modality(m)(ld.modality_cfgs.get(m)) for src in ld.sources.values() for m in src.modalities}
        cache = ShardCache(ld.cfg.cache.dir, ld.cfg.cache.max_bytes) if ld.cfg.cache else None
        readers = {
            name: _SourceReader(name, src, ld.shardsets[name], state.sources[name], ld.planner(name), stream, ld.cfg,
                                ld.seed, needed_extensions(src, mods), cache)
            for name, src in ld.sources.items()
        }
        alive = list(ld.sources)
        while alive:
            name = ld.choose_source(state.batch, alive)
            items, keys, skips = [], [], readers[name].skips
            while len(items) < ld.cfg.batch_size:
                got = readers[name].next()
                if got is None:
                    alive.remove(name)
                    break
                item = self._prepare(name, mods, *got, skips)
                if item is not None:
                    items.append(item)
                    keys.append(f"{name}:{shard_name(got[1])}:{got[2]['__key__']}")
            full = items and not (len(items) < ld.cfg.batch_size and ld.cfg.drop_last)
            if not full and not skips:
                continue
            # a batch, or nothing to hand out but skips that must still be reported and counted
            batch = self._collate(name, mods, items) if full else {"__empty__": True}
            state.batch += ld.workers_per_rank  # the saved state names the batch that comes next
            batch["__meta__"] = {"stream": stream, "state": state.clone(), "keys": keys if full else [],
                                 "skips": list(skips)}
            skips.clear()
            yield batch

    def _prepare(self, name: str, mods: dict, epoch: int, path: str, sample: dict, skips: list) -> dict | None:
        src, ld = self.loader.sources[name], self.loader
        try:
            return prepare_sample(sample, src, mods, ld.seed, epoch if ld.cfg.augment else None, path,
                                  ld.cfg.views if ld.cfg.augment else 1)
        except SampleError as e:
            if ld.cfg.on_error == "raise":
                raise
            skips.append((1, str(e)))
            return None

    def _collate(self, name: str, mods: dict, items: list[dict]) -> dict:
        batch: dict[str, Any] = {m: mods[m].collate([it[m] for it in items]) for m in self.loader.sources[name].modalities}
        if "__views__" in items[0]:
            batch["__views__"] = {m: {str(v + 1): mods[m].collate([it["__views__"][m][v] for it in items])
                                      for v in range(len(items[0]["__views__"][m]))} for m in items[0]["__views__"]}
        if self.loader.sources[name].label:
            batch["cls"] = torch.tensor([it["cls"] for it in items], dtype=torch.long)
        batch["__key__"] = [it["__key__"] for it in items]
        batch["__source__"] = name
        return batch


@functools.lru_cache(maxsize=4096)
def shard_name(path: str) -> str:
    """The file name of a shard, as it appears in sample keys (asked for once per sample)."""
    return os.path.basename(path)


def _as_is(batch: dict) -> dict:
    return batch


def needed_extensions(src: SourceConfig, mods: dict) -> frozenset[str] | None:
    """Shard keys ``prepare_sample`` may read for ``src``: the others need not be read at all.
    None (read everything) when a modality chooses its key by other means than its extensions."""
    exts = {src.label} if src.label else set()
    if src.holdout and src.holdout_by:
        exts.add("json")
    for m in src.modalities:
        if type(mods[m]).pick is not Modality.pick:
            return None
        exts.update(mods[m].extensions)
    return frozenset(exts)


def prepare_sample(sample: dict, src: SourceConfig, mods: dict, seed: int, epoch: int | None, path: str,
                   views: int = 1) -> dict:
    """Raw shard sample → per-sample tensors for every modality of ``src`` (+ label), and with
    ``views`` > 1 the extra views under ``"__views__"`` as ``{modality: [view 1, …]}``, decoded once.
    ``epoch=None`` means no augmentation. Raises ``SampleError`` naming shard, key and cause."""
    key = sample["__key__"]
    rng_key = f"{shard_name(path)}:{key}"
    out: dict[str, Any] = {"__key__": key}
    for m in src.modalities:
        mod = mods[m]
        ext = mod.pick(sample)
        if ext is None:
            have = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
            raise SampleError(f"{path}: sample {key!r}: no {m} (looked for {', '.join(mod.extensions)}; has {have})")
        try:
            item = mod.decode(sample[ext], ext)
            rng = sample_rng(seed, epoch, f"{m}:{rng_key}") if epoch is not None else None
            out[m] = mod.transform(item, rng)
            if views > 1:  # view 0 keeps the one-view seed: a run with more views sees the same view 0
                out.setdefault("__views__", {})[m] = [mod.transform(item, sample_rng(seed, epoch, f"{m}:{rng_key}:{v}"))
                                                      for v in range(1, views)]
        except ValueError as e:
            raise SampleError(f"{path}: sample {key!r}: {e}") from None
    if src.label:
        raw = sample.get(src.label)
        try:
            out["cls"] = int(raw.decode().strip())
        except (AttributeError, ValueError, UnicodeDecodeError):
            what = "missing" if raw is None else f"not an integer ({raw[:20]!r})"
            raise SampleError(f"{path}: sample {key!r}: label {src.label!r} {what}") from None
    return out


class StreamingLoader:
    """Iterable of batch dicts for one process, with ``state_dict`` / ``load_state_dict``.

    Not to be passed through ``accelerator.prepare``: it already splits work by process, and
    Accelerate would shard it a second time. Move batches to the device with ``to_device``."""

    def __init__(
        self,
        sources: dict[str, SourceConfig],
        cfg: LoaderConfig,
        modality_cfgs: dict[str, Any] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        base_dir: Path | None = None,
    ):
        if not sources:
            raise ConfigError("loader: no sources given")
        self.sources, self.cfg, self.seed = sources, cfg, seed
        self.modality_cfgs = modality_cfgs or {}
        self.rank, self.world_size = rank, world_size
        self.workers_per_rank = max(1, cfg.num_workers)
        if cfg.storage_options:
            set_storage_options(cfg.storage_options)
        self.shardsets = {name: open_shards(src.shards, base_dir) for name, src in sources.items()}
        for src in sources.values():
            for m in src.modalities:
                registry.modality(m)  # unknown modality: error now, not in a worker
        counts = {n: [s.count for s in ss.shards] for n, ss in self.shardsets.items()}
        streams = {self.rank * self.workers_per_rank + w: StreamState.fresh(w, list(sources))
                   for w in range(self.workers_per_rank)}
        self.position = LoaderState(seed, rank, world_size, self.workers_per_rank, counts, streams)

    @property
    def batches(self) -> int:
        return self.position.batches

    @property
    def skipped(self) -> int:
        return self.position.skipped

    @property
    def n_streams(self) -> int:
        return self.world_size * self.workers_per_rank

    def planner(self, name: str):
        counts, n = self.position.counts[name], self.n_streams
        return lambda epoch: plan_epoch(counts, self.seed, name, epoch, n)

    def choose_source(self, k: int, alive: list[str]) -> str:
        """Source of rank-level batch ``k``: weighted, and the same on every process."""
        if len(alive) == 1:
            return alive[0]
        weights = [self.sources[n].weight for n in alive]
        return random.Random(hash_int(self.seed, "mix", k)).choices(alive, weights)[0]

    def __iter__(self) -> Iterator[dict]:
        dataset = StreamingDataset(self)
        kwargs = {"prefetch_factor": self.cfg.prefetch_factor} if self.cfg.num_workers > 0 else {}
        # Batches are already tensors: the default per-batch conversion would only walk every key
        # string and the stream state looking for numpy arrays.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_as_is, **kwargs)
        ledger = open_ledger(self.cfg.ledger, self.rank) if self.cfg.ledger else None
        pos = self.position
        try:
            for batch in loader:
                meta = batch.pop("__meta__")
                pos.streams[meta["stream"]] = meta["state"]
                pos.rotation = (meta["stream"] % self.workers_per_rank + 1) % self.workers_per_rank
                for count, msg in meta["skips"]:
                    log.warning("skipped %d sample%s: %s", count, "s" * (count > 1), msg)
                    pos.skipped += count
                if batch.pop("__empty__", False):
                    continue
                if ledger is not None:
                    ledger.write(json.dumps({"batch": pos.batches, "keys": meta["keys"]}) + "\n")
                    ledger.flush()
                pos.batches += 1
                yield batch
        finally:
            if ledger is not None:
                ledger.close()

    # -- position -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This process's position (``LoaderState.to_json``): every one of its streams, as consumed."""
        return self.position.to_json()

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Resume from the states of all processes of the earlier run (one dict per rank; a single
        dict is accepted for a one-process run)."""
        old = [LoaderState.from_json(st) for st in (states if isinstance(states, list) else [states])]
        p = self.position
        self.position = resume(old, Topology(p.rank, p.world_size, p.workers_per_rank, p.seed, p.counts))
        if self.cfg.ledger:
            truncate_ledger(self.cfg.ledger, old, self.rank, self.world_size)


def to_device(batch: dict, device) -> dict:
    """Tensors (also inside nested dicts) moved to ``device``; other values untouched."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out
