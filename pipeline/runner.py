"""Recipe → stages in order, each into ``<runs>/<recipe name>/<stage name>/``.

A stage is skipped when its ``done.json`` holds the hash of its current settings, the recipe's
sources and modality settings, the content of its declared inputs and the hashes of every stage
before it. A stage without ``done.json`` is run again in the same directory; stages that
checkpoint continue from there. When the settings changed, the stale directory is cleared first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from pipeline import lock, registry
from pipeline.config import Config, ConfigError, apply_overrides, build, dump, load_yaml
from pipeline.data.loader import SourceConfig
from pipeline.data.remote import redact
from pipeline.stage import Context, Stage, StageConfig

log = logging.getLogger("selfsup")
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "starter.yaml"


class Recipe(Config):
    name: str
    seed: int = 0
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    #: per-modality settings, validated by each modality's Config
    modalities: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: ordered stages: ``{name: ..., stage: <stage type, default = name>, <settings>...}``
    stages: list[dict[str, Any]]


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    data = apply_overrides(load_yaml(path), list(overrides))
    recipe = build(Recipe, data, str(path))
    modalities = {}
    for name, settings in recipe.modalities.items():
        try:
            cls = registry.modality(name)
        except ConfigError as e:
            raise ConfigError(f"{path}: modalities: {e}") from None
        modalities[name] = build(cls.Config, settings, f"{path}: modalities.{name}")
    plain_name(recipe.name, f"{path}: name")
    names = [s.get("name") for s in recipe.stages]
    for i, entry in enumerate(recipe.stages):
        if not entry.get("name"):
            raise ConfigError(f"{path}: stages[{i}]: missing 'name'")
        plain_name(entry["name"], f"{path}: stages[{i}].name")
        if names.count(entry["name"]) > 1:
            raise ConfigError(f"{path}: stages: name {entry['name']!r} is used twice")
        stage_config(entry, str(path))  # every stage's settings are checked before any stage runs
    return recipe, modalities


def plain_name(name: Any, where: str) -> str:
    """A run or stage name, which becomes a directory: one plain path component, never ``..``."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or set(name) == {"."}:
        raise ConfigError(f"{where}: {name!r} is not a plain name (letters, digits, '_', '-', '.'; it names a "
                          f"directory, so no '/' and not '.' or '..')")
    return name


def stage_config(entry: dict, where: str) -> tuple[Stage, StageConfig]:
    kind = entry.get("stage", entry["name"])
    try:
        stage = registry.stage(kind)
    except ConfigError as e:
        raise ConfigError(f"{where}: stages.{entry['name']}: {e}") from None
    settings = {k: v for k, v in entry.items() if k not in ("name", "stage")}
    return stage, build(stage.Config, settings, f"{where}: stages.{entry['name']} ({kind})")


def run_recipe(path: str | Path, overrides: list[str] = (), runs: str | Path = "runs",
               only: list[str] | None = None, force: bool = False, progress: bool = True,
               break_lock: bool = False) -> Path:
    """Run the recipe's stages in order into ``runs/<name>/``, holding that directory's lock (process
    0 of a launch takes it for all of them)."""
    path = Path(path)
    recipe, modalities = load_recipe(path, overrides)
    run_dir = Path(runs) / recipe.name
    held = lock.hold(run_dir, break_lock) if launch_info()[0] == 0 else contextlib.nullcontext()
    with held:
        _run_stages(path, recipe, modalities, run_dir, only, force, progress)
    return run_dir


def _run_stages(path: Path, recipe: Recipe, modalities: dict, run_dir: Path, only, force: bool, progress: bool) -> None:
    resolved = {**dump(recipe), "modalities": {k: dump(v) for k, v in modalities.items()}}
    if launch_info()[0] == 0:  # process 0 owns the run directory (it holds the lock)
        _write(run_dir / "recipe.yaml", yaml.safe_dump(redact(resolved), sort_keys=False))
    planned = [(entry, *stage_config(entry, str(path))) for entry in recipe.stages]
    unknown = sorted(set(only or ()) - {e["name"] for e, _, _ in planned})
    if unknown:
        raise ConfigError(f"--only: no stage named {unknown[0]!r} in {path}")
    chain = hashlib.sha256(json.dumps({"sources": resolved["sources"], "modalities": resolved["modalities"],
                                       "seed": recipe.seed}, sort_keys=True).encode()).hexdigest()
    if only:  # the stages after the last one named are not looked at: their inputs (an export's
        # stage directories, say) need not exist yet
        planned = planned[: max(i for i, (e, _, _) in enumerate(planned) if e["name"] in only) + 1]
    for entry, stage, cfg in planned:
        ctx = Context.of_recipe(recipe, modalities, path, run_dir, run_dir / entry["name"], progress)
        inputs = stage.inputs(cfg, ctx)
        chain = _hash(chain, entry.get("stage", entry["name"]), dump(cfg), [fingerprint(_input(p)) for p in inputs])
        if only and entry["name"] not in only:
            continue
        run_stage(stage, cfg, ctx, chain, force)


def run_stage(stage: Stage, cfg, ctx: Context, digest: str, force: bool = False, clear: bool = True) -> dict:
    """Run one stage into ``ctx.out_dir`` unless up to date; ``clear=False`` never deletes files there.

    Under a multi-process launch (``accelerate launch``, torchrun) process 0 owns the stage
    directory; the others follow it (``_follow``)."""
    done_file, started = ctx.out_dir / "done.json", ctx.out_dir / "stage.json"
    rank, world, launch = launch_info()
    if world > 1 and rank != 0:
        return _follow(stage, cfg, ctx, digest, force, launch)
    if not force and done_file.is_file() and json.loads(done_file.read_text()).get("hash") == digest:
        log.info("%s: up to date, skipped", ctx.out_dir.name)
        return json.loads(done_file.read_text())["summary"]
    if clear and ctx.out_dir.exists() and (force or not started.is_file() or json.loads(started.read_text()).get("hash") != digest):
        _clear(ctx.out_dir, started, force)
    elif started.is_file() and not done_file.is_file():
        log.info("%s: continuing an interrupted run", ctx.out_dir.name)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    _write(started, json.dumps({"hash": digest, "started": time.time(), "launch": launch}))
    _write(ctx.out_dir / "config.yaml", yaml.safe_dump(redact(dump(cfg)), sort_keys=False))
    log.info("%s: running", ctx.out_dir.name)
    t0 = time.time()
    summary = stage.run(cfg, ctx) or {}
    _write(done_file, json.dumps({"hash": digest, "seconds": round(time.time() - t0, 2), "summary": summary,
                                  "launch": launch}, indent=1, default=str))
    return summary


def _clear(out_dir: Path, started: Path, force: bool) -> None:
    """Make way for a stage whose settings changed (or that is forced). Work that cost training
    time (checkpoints) is kept aside under the old settings' hash unless forced; the rest is stale."""
    if not force and (out_dir / "checkpoints").is_dir():
        try:
            old = json.loads(started.read_text()).get("hash", "unknown")[:12]
        except (OSError, ValueError):
            old = "unknown"
        aside = out_dir.with_name(f"{out_dir.name}.{old}")
        n = 1
        while aside.exists():
            aside, n = out_dir.with_name(f"{out_dir.name}.{old}-{n}"), n + 1
        os.replace(out_dir, aside)
        log.warning("%s: settings changed; the earlier run (with checkpoints) is kept in %s", out_dir.name, aside)
        return
    shutil.rmtree(out_dir)


def launch_info() -> tuple[int, int, str]:
    """(rank, number of processes, an id shared by the processes of this launch)."""
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID") or f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), run_id


def _follow(stage: Stage, cfg, ctx: Context, digest: str, force: bool, launch: str) -> dict:
    """A process other than 0 of a launch. A stage that runs on many processes (``distributed``:
    pretrain) starts once process 0 has prepared the directory for this
    launch; any other stage is process 0's alone, and this one waits for its ``done.json``."""
    def ready(path: Path, need_launch: bool) -> dict | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("hash") == digest and (not need_launch or data.get("launch") == launch) else None

    def wait(path: Path, need_launch: bool) -> dict:
        while (data := ready(path, need_launch)) is None:
            time.sleep(0.2)  # if process 0 fails, the launcher stops this process too
        return data

    done = ready(ctx.out_dir / "done.json", need_launch=force)
    if done is not None:
        return done["summary"]
    if stage.distributed:
        wait(ctx.out_dir / "stage.json", need_launch=True)
        return stage.run(cfg, ctx) or {}
    return wait(ctx.out_dir / "done.json", need_launch=True)["summary"]


def _input(p: str) -> Path | str:
    return p if "://" in str(p) else Path(p)


def fingerprint(path: Path) -> str:
    """Content hash of an input: a file's bytes, a shard folder's manifest, or a folder's listing;
    for a URL, its manifest's bytes or the store's size and tag (no shard is downloaded)."""
    from pipeline.data import remote

    if remote.is_url(str(path)):
        return remote.fingerprint(str(path))
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.stat().st_size < 1 << 26 else \
            f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if (path / "manifest.json").is_file():
        return fingerprint(path / "manifest.json")
    if path.is_dir():
        return _hash(*sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in path.rglob("*") if p.is_file()))
    return "missing"


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
