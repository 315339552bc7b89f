"""Pre-flight check of a shard set: every shard readable to the end, sample counts and sha256
as the manifest promises, required keys present, and samples decodable by their modalities.

    selfsup validate SHARDS [--full] [--require png,cls] [--processes N --workers W]

Every problem is one line naming the shard file, the sample key and what is wrong. Shards are
checked in parallel, one process per core; by default a sample of each shard is decoded (the
first 16 and a few spread through it), ``--full`` decodes all of them. The summary goes to
``report.json``; the command exits with status 1 when any error was found.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator

from pipeline import registry
from pipeline.data import remote
from pipeline.data.shards import ShardError, iter_samples, read_manifest, resolve_spec, sha256_file
from pipeline.data.tarstream import split_member
from pipeline.data.writer import index_shards
from pipeline.stage import Context, StageConfig

HEAD, SPREAD = 16, 8  # samples decoded per shard without --full: the first HEAD, and SPREAD more spaced evenly


class Config(StageConfig):
    shards: list[str] = Field(description="shard directories (with manifest.json), manifests, brace patterns or globs")
    require: list[str] = Field(default=[], description="keys every sample must have; 'jpg|png' means one of them")
    full: bool = Field(default=False, description="decode every sample, not a sample of each shard")
    processes: int = Field(default=1, ge=1, description="training processes that will read these shards")
    workers: int = Field(default=2, ge=0, description="dataloader workers per training process")
    jobs: int | None = Field(default=None, ge=1, description="checking processes (default: one per core)")
    max_errors: int = Field(default=50, ge=0, description="errors listed; the rest are only counted")
    index: bool = Field(default=False, description="shards without a manifest that pass: write one beside them "
                                                   "(counts, sha256, per-sample byte offsets for exact remote resume)")

    @field_validator("require", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``--require png,cls`` arrives as one string."""
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value


positional = ("shards",)


@dataclass(frozen=True)
class Task:
    """One shard to check, with what its manifest (if any) promises about it."""

    path: str
    count: int | None = None
    sha256: str | None = None


@dataclass
class Result:
    path: str
    samples: int = 0
    n_errors: int = 0
    #: whole-shard problems (checksum, truncation, count): few, always kept, listed first
    shard_errors: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unchecked: set[str] = field(default_factory=set)


def inputs(cfg: Config, ctx: Context) -> list[str]:
    return shard_inputs(cfg.shards, ctx)


def shard_inputs(specs: list[str], ctx: Context) -> list[str]:
    """What to fingerprint for a shard set: its manifests, or its tar files when it has none."""
    return [p for spec in specs for p in resolve_spec(ctx.path(spec)).inputs]


def run(cfg: Config, ctx: Context) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    tasks = resolve(cfg.shards, ctx)
    groups = [set(g.split("|")) for g in cfg.require]
    plan = Plan(groups, cfg.full, {m: ctx.modalities.get(m) for m in registry.names("modality")}, cfg.max_errors)
    total = sum(t.count for t in tasks if t.count is not None) or None
    bar = tqdm(total=total, desc="validate", unit="sample", disable=not ctx.progress, dynamic_ncols=True)
    try:
        results = _check_all(tasks, plan, cfg.jobs, bar)
    finally:
        bar.close()
    summary = _summarize(cfg, tasks, results, time.time() - t0)
    if cfg.index and summary["status"] == "ok":
        summary["indexed"] = [index_shards(found.files) for spec in cfg.shards
                              if (found := resolve_spec(_short(ctx.path(spec)))).manifest is None]
    _report(summary, cfg.max_errors)
    (ctx.out_dir / "report.json").write_text(json.dumps(summary, indent=1))
    return summary


def resolve(specs: list[str], ctx: Context) -> list[Task]:
    """Shard specs → tasks, without reading any tar (an unreadable or missing shard is a finding, not a crash)."""
    tasks = []
    for spec in specs:
        found = resolve_spec(_short(ctx.path(spec)))
        if found.manifest is not None:
            tasks += [Task(s.path, s.count, s.sha256) for s in read_manifest(found.manifest).shards]
        else:
            tasks += [Task(f) for f in found.files]
    return tasks


def _short(path: Path) -> Path:
    """Paths under the working directory are shown relative to it, as a person typed them."""
    if isinstance(path, str):  # a URL
        return path
    try:
        return path.resolve().relative_to(Path.cwd().resolve()) if path.is_absolute() else path
    except ValueError:
        return path


@dataclass
class Plan:
    """What to check in every sample: required key groups, which samples to decode, and how."""

    require: list[set[str]]
    full: bool
    modality_cfgs: dict
    max_errors: int

    def decoded(self, index: int, count: int | None) -> bool:
        if self.full or index < HEAD:
            return True
        stride = max(1, (count or 0) // SPREAD)
        return count is not None and index % stride == stride // 2


_PLAN: Plan | None = None  # inherited by forked checkers
_DONE = None  # shared sample counter read by the progress bar


def _check_all(tasks: list[Task], plan: Plan, jobs: int | None, bar) -> list[Result]:
    global _PLAN, _DONE
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        _PLAN = plan
        return [check_shard(t, bar.update) for t in tasks]
    fork = mp.get_context("fork")
    _PLAN, _DONE = plan, fork.Value("q", 0)
    with fork.Pool(jobs) as pool:
        pending = pool.map_async(_check_in_pool, tasks, chunksize=1)
        while not pending.ready():
            pending.wait(0.2)
            bar.update(_DONE.value - bar.n)
        results = pending.get()
    bar.update(_DONE.value - bar.n)
    return results


def _check_in_pool(task: Task) -> Result:
    def tick(n: int) -> None:
        with _DONE.get_lock():
            _DONE.value += n

    return check_shard(task, tick)


def check_shard(task: Task, tick) -> Result:
    """Read one shard to the end; ``tick(n)`` reports progress every few samples."""
    res = Result(task.path)
    if not remote.exists(task.path):
        _add(res, f"{task.path}: no such file{', though the manifest lists it' if task.count is not None else ''}",
             shard=True)
        return res
    if task.sha256 and (actual := sha256_file(task.path)) != task.sha256:
        _add(res, f"{task.path}: sha256 {actual[:12]}… differs from the manifest's {task.sha256[:12]}… "
                  "(file changed since it was written; rebuild the shards or the manifest)", shard=True)
    mods: dict = {}
    ticked = 0
    def special(name: str, kind: str) -> None:
        key = split_member(name)[0]
        _add(res, f"{task.path}: sample {key!r}: member {name!r} is a {kind}, which readers skip "
                  "(store the file itself in the shard)")

    try:
        for sample in iter_samples(task.path, on_other=special):
            for problem in check_sample(sample, _PLAN.decoded(sample["__index__"], task.count), mods, res.unchecked):
                _add(res, f"{task.path}: sample {sample['__key__']!r}: {problem}")
            res.samples += 1
            if res.samples - ticked >= 64:
                tick(res.samples - ticked)
                ticked = res.samples
    except ShardError as e:
        _add(res, f"{e} ({res.samples} samples read; re-copy or rebuild this shard)", shard=True)
    tick(res.samples - ticked)
    if task.count is not None and res.samples != task.count:
        _add(res, f"{task.path}: holds {res.samples} samples, the manifest promises {task.count}", shard=True)
    return res


def check_sample(sample: dict, decode: bool, mods: dict, unchecked: set[str]) -> list[str]:
    """Problems of one sample, each a short phrase; decodes only when ``decode``."""
    keys = [k for k in sample if not k.startswith("__")]
    problems = [_missing(group, keys) for group in _PLAN.require if not group & set(keys)]
    if not decode:
        return problems
    for ext in keys:
        try:
            if not _decode(ext, sample[ext], mods):
                unchecked.add(ext)
        except Exception as e:  # noqa: BLE001 - a decoder's failure on bad bytes is a finding, whatever its type
            kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
            problems.append(f"{ext}: {kind}{e}")
    return problems


def _missing(group: set[str], keys: list[str]) -> str:
    want = next(iter(group)) if len(group) == 1 else f"one of {', '.join(sorted(group))}"
    return f"missing required key {want!r} (has {', '.join(keys) or 'nothing'})"


def _decode(ext: str, data: bytes, mods: dict) -> bool:
    """Decode ``data`` as the key ``ext`` says; False when nothing knows how to check it."""
    suffix = ext.rsplit(".", 1)[-1]  # webdataset decodes ``seg.png`` by its last part, as png
    if suffix == "cls":
        try:
            int(data.decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"not an integer ({data[:20]!r})") from None
        return True
    if suffix == "json":
        json.loads(data)  # JSONDecodeError is a ValueError naming line and column
        return True
    name = registry.modality_for_extension(suffix)
    if name is None:
        return False
    if name not in mods:
        mods[name] = registry.modality(name)(_PLAN.modality_cfgs.get(name))
    item = mods[name].decode(data, ext)
    # The transform (resize, crop, mel) only says more when the recipe gives the sizes training uses;
    # without them it would resize every image to the default 224 px for nothing.
    if not mods[name].transform_needs_assets and _PLAN.modality_cfgs.get(name) is not None:
        mods[name].transform(item, None)
    return True


def _add(res: Result, line: str, shard: bool = False) -> None:
    res.n_errors += 1
    if shard:
        res.shard_errors.append(line)
    elif len(res.errors) < _PLAN.max_errors:
        res.errors.append(line)


def _summarize(cfg: Config, tasks: list[Task], results: list[Result], seconds: float) -> dict:
    samples = sum(r.samples for r in results)
    # a broken shard must not hide behind thousands of samples that all miss the same key
    errors = [line for r in results for line in r.shard_errors] + [line for r in results for line in r.errors]
    errors = errors[: cfg.max_errors]
    n_errors = sum(r.n_errors for r in results)
    warnings = []
    streams = cfg.processes * max(1, cfg.workers)
    if len(tasks) < streams:
        warnings.append(f"{len(tasks)} shards for {cfg.processes} processes × {cfg.workers} workers = {streams} "
                        "streams: streams will share slices of shards, which mixes samples less; "
                        f"reshard into at least {streams} shards")
    unchecked = sorted(set().union(*(r.unchecked for r in results)))
    if unchecked:
        warnings.append(f"keys not checked (no modality owns them): {', '.join(unchecked)}")
    return {"status": "failed" if n_errors else "ok", "shards": len(tasks), "samples": samples,
            "decoded": "all" if cfg.full else "sample", "errors": errors, "n_errors": n_errors,
            "warnings": warnings, "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1) if seconds > 0 else None}


def _report(summary: dict, max_errors: int) -> None:
    for line in summary["errors"]:
        print(f"ERROR {line}")
    if summary["n_errors"] > max_errors:
        print(f"… and {summary['n_errors'] - max_errors} more errors (raise --max-errors to list them)")
    for line in summary["warnings"]:
        print(f"WARNING {line}")
    print(f"validate: {summary['status']}: {summary['shards']} shards, {summary['samples']} samples "
          f"({summary['decoded']} decoded) in {summary['seconds']:.1f}s = {summary['samples_per_s']} samples/s, "
          f"errors: {summary['n_errors']}, warnings: {len(summary['warnings'])}")
