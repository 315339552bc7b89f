"""Pretrain encoders with one or more objectives (mlm, mae, data2vec, clip) on the recipe's sources.

    selfsup pretrain --recipe recipes/starter.yaml --sources '[fmnist]' --objectives '{mae: {}}' --steps 300
    accelerate launch --config_file accelerate_config.yaml -m pipeline.cli pretrain --recipe ... (many processes)

Several objectives train at once as a weighted sum; each sees the batches of the sources holding
its modalities (``sources: {fmnist: 3, emoji: 1}`` mixes them by weight). An encoder may start from
an earlier stage's output (``encoders: {image: {init_from: "{run}/pretrain_mae/encoders/image"}}``).
Writes ``checkpoints/`` (resumed from when the stage runs again), ``metrics.jsonl``, ``tb/`` and, at
the end, ``encoders/<modality>/``: stock transformers models (+ tokenizer for text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipeline import registry
from pipeline.config import ConfigError, build, dump
from pipeline.data.loader import LoaderConfig
from pipeline.encoders import saved
from pipeline.encoders.base import EncoderConfig
from pipeline.stage import Context, StageConfig
from pipeline.train.loop import TrainerConfig

#: every process of a launch runs this stage (the runner leaves other stages to process 0)
distributed = True


class Config(TrainerConfig, StageConfig):
    #: recipe sources to train on: a list, or {source: weight} to override their mixing weights
    sources: list[str] | dict[str, float]
    #: {name: settings}; the objective is ``settings.objective`` or, by default, the name itself
    objectives: dict[str, dict[str, Any]]
    #: per-modality encoder settings (size, patch_size, pooling, init_from …)
    encoders: dict[str, EncoderConfig] = Field(default_factory=dict)
    #: per-modality train-time augmentation of this stage only, over the recipe's ``modalities``
    #: settings (e.g. ``{image: {crop_scale: [0.08, 1.0], brightness: 0.4}}``; each modality's
    #: ``augment_keys``); an encoder saved by an earlier stage does not pass its augmentation on
    augment: dict[str, dict[str, Any]] = Field(default_factory=dict)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    #: every N steps, a kNN probe of the encoders on ``eval_source`` (logged as ``knn/<modality>/top1``)
    eval_every: int | None = Field(None, ge=1)
    #: a labelled recipe source this stage does not train on (a test or validation split)
    eval_source: str | None = None
    #: samples of ``eval_source`` the probe reads (half memory bank, half queries)
    eval_samples: int = Field(512, ge=4)

    @field_validator("objectives")
    @classmethod
    def _known(cls, v: dict[str, dict]) -> dict[str, dict]:
        """Each objective's settings resolved when the recipe loads: typos fail then, and the stage's
        ``config.yaml``, hash and checkpoints hold every default."""
        if not v:
            raise ValueError("name at least one objective, e.g. {mae: {}}")
        resolved = {}
        for name, settings in v.items():
            kind, _, ocfg = objective_config(name, settings)
            resolved[name] = {"objective": kind, **dump(ocfg)}
        return resolved


def objective_config(name: str, settings: dict | None):
    """(kind, module, config) of objective ``name``: kind is ``settings.objective`` or the name itself."""
    settings = dict(settings or {})
    kind = settings.pop("objective", name)
    module = registry.module("objective", kind)
    return kind, module, build(module.Config, settings, f"objectives.{name} ({kind})")


def inputs(cfg: Config, ctx: Context) -> list[str]:
    shards = [s for n in cfg.sources for s in _as_list(ctx.source(n).shards)] if ctx.sources else []
    starts = [e.init_from for e in cfg.encoders.values() if e.init_from]
    starts += [o["init_from"] for o in cfg.objectives.values() if o.get("init_from")]
    return [str(ctx.path(p)) for p in shards + starts]


def run(cfg: Config, ctx: Context) -> dict:
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from pipeline.train.loop import train

    built = {name: objective_config(name, s) for name, s in cfg.objectives.items()}  # name → (kind, module, cfg)
    # several objectives see different batches (a mixture), so some parameters sit out some steps
    ddp = DistributedDataParallelKwargs(find_unused_parameters=len(built) > 1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    ctx.log.info("%d process(es), %s, precision %s, on %s", accelerator.num_processes,
                 accelerator.distributed_type.value, accelerator.mixed_precision, accelerator.device.type)
    torch.manual_seed(ctx.seed)  # the same initial weights on every process and every run

    mods, learner, loader = assemble(cfg, ctx, built, accelerator)
    resolved = cfg.model_dump(mode="json")
    probe = _probe(cfg, ctx, {m: mod.cfg for m, mod in mods.items()})
    summary = train(learner, loader, cfg, ctx.out_dir, accelerator, resolved, progress=ctx.progress, probe=probe)
    export(learner, mods, {name: kind for name, (kind, _, _) in built.items()}, ctx.out_dir, accelerator)
    ctx.log.info("trained %d steps; encoders in %s, heads in %s", summary["step"], ctx.out_dir / "encoders",
                 ctx.out_dir / "heads")
    return summary


def assemble(cfg: Config, ctx: Context, built: dict, accelerator):
    """(modalities, learner, loader) of the stage: its encoders, its objectives (``built``: name →
    (kind, module, config)) continuing from any ``init_from`` heads, and this process's loader."""
    from pipeline.data.loader import StreamingLoader
    from pipeline.train.learner import Learner

    needed = sorted({m for _, _, ocfg in built.values() for m in ocfg.reads()})
    mods, encoders = {}, {}
    for m in needed:
        mods[m], encoders[m] = build_encoder(m, cfg.encoders.get(m, EncoderConfig()), ctx, cfg.augment.get(m))
    objectives = {}
    for name, (kind, module, ocfg) in built.items():
        objectives[name] = module.Objective(ocfg, encoders, name, ctx.seed)
        if ocfg.init_from:
            saved.load_heads_into(objectives[name], kind, ctx.path(ocfg.init_from), f"objectives.{name}")
    loader = StreamingLoader(_sources(cfg, ctx, needed), cfg.loader, {m: mods[m].cfg for m in needed}, seed=ctx.seed,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, base_dir=ctx.base_dir)
    return mods, Learner(encoders, objectives), loader


def _probe(cfg: Config, ctx: Context, mod_cfgs: dict):
    """The online kNN probe ``eval_every`` asks for, or None."""
    if cfg.eval_every is None:
        return None
    from pipeline.train.probe import OnlineKnn

    if not cfg.eval_source:
        raise ConfigError("eval_source: eval_every needs a labelled recipe source to probe (a test split)")
    if cfg.eval_source in cfg.sources:
        raise ConfigError(f"eval_source: {cfg.eval_source} is also trained on (sources); name a held-out split")
    return OnlineKnn(cfg.eval_source, ctx.source(cfg.eval_source), mod_cfgs, cfg.eval_samples, cfg.eval_every,
                     ctx.base_dir, ctx.seed)


def build_encoder(m: str, ecfg: EncoderConfig, ctx: Context, augment: dict | None = None):
    """(modality, encoder) of modality ``m``: from the recipe's settings, or from an ``init_from``
    directory whose saved settings fill in what the recipe leaves out (and must agree with it);
    ``augment``: the stage's augmentation settings over those."""
    mcfg = ctx.modality_config(m)
    try:
        if ecfg.init_from:
            start = ctx.path(ecfg.init_from)
            ecfg, mcfg = saved.merge(start, ecfg, mcfg, m, f"encoders.{m}")
            ecfg = ecfg.model_copy(update={"init_from": str(start)})
        if augment:
            mcfg = _augmented(m, mcfg, augment)
        mod = registry.modality(m)(mcfg)
        return mod, mod.encoder(ecfg)
    except ConfigError as e:
        raise ConfigError(e if str(e).startswith(("encoders.", "modalities.")) else f"encoders.{m}: {e}") from None


def _augmented(m: str, mcfg, augment: dict):
    """``mcfg`` (None: the modality's defaults) with the stage's augmentation settings."""
    cls = registry.modality(m)
    for key in augment:
        if key not in cls.augment_keys:
            raise ConfigError(f"augment.{m}.{key}: not an augmentation setting of {m} "
                              f"({', '.join(sorted(cls.augment_keys)) or 'it has none'}); "
                              f"other settings belong under the recipe's modalities.{m}")
    return build(cls.Config, {**(dump(mcfg) if mcfg is not None else {}), **augment}, f"augment.{m}")


def export(learner, mods: dict, kinds: dict[str, str], out: Path, accelerator) -> None:
    """Each encoder of ``learner`` in ``out/encoders/<modality>`` (a stock transformers model,
    its tokenizer for text, and ``selfsup.json``), each objective's heads in ``out/heads/<name>``.
    The weights come from the learner's whole state dict, which Accelerate gathers from every
    process's shard under FSDP (a collective: every process calls this), then process 0 writes."""
    weights = accelerator.get_state_dict(learner)
    if accelerator.is_main_process:
        for m, enc in learner.encoders.items():
            saved.save(enc, mods[m], out / "encoders" / m, _under(weights, f"encoders.{m}.model."))
        for name, obj in learner.objectives.items():
            saved.save_heads(obj, kinds[name], out / "heads" / name, _under(weights, f"objectives.{name}."))
    accelerator.wait_for_everyone()


def _under(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _sources(cfg: Config, ctx: Context, needed: list[str]) -> dict:
    """The stage's sources, each decoding only the modalities some objective reads."""
    out = {}
    weights = cfg.sources if isinstance(cfg.sources, dict) else {}
    for name in cfg.sources:
        src = ctx.source(name)
        mods = [m for m in src.modalities if m in needed]
        if not mods:
            raise ConfigError(f"sources: {name} holds {', '.join(src.modalities)}, which no objective of this stage trains")
        out[name] = src.model_copy(update={"modalities": mods, "weight": weights.get(name, src.weight)})
    return out


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]
