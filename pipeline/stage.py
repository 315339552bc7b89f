"""The contract every ``stages/<name>.py`` fulfils, and what a stage is handed when it runs.

A stage module defines ``Config`` (a ``StageConfig``) and ``run(cfg, ctx) -> dict``; the dict is a
short summary stored in the stage's ``done.json``. Optional: ``positional`` (config fields taken
as positional command-line arguments), ``inputs(cfg, ctx) -> list[str]`` (files whose content
decides whether the stage must run again) and ``distributed = True`` (every process of a launch
runs it, not process 0 alone). ``Stage.of(module)`` checks a module against this contract once
and is what the runner and the command line use. Stages are thin: they wire configs to the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.config import Config, ConfigError


class StageConfig(Config):
    """Base of every stage's settings."""


def _no_inputs(cfg, ctx) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    """A stage module seen through its contract."""

    name: str
    Config: type[StageConfig]
    run: Callable[[StageConfig, Context], dict | None]
    inputs: Callable[[StageConfig, Context], list[str]] = _no_inputs
    positional: tuple[str, ...] = ()
    distributed: bool = False
    doc: str = ""

    @classmethod
    def of(cls, module: ModuleType) -> Stage:
        name = module.__name__.rsplit(".", 1)[-1]
        config, run = getattr(module, "Config", None), getattr(module, "run", None)
        if not (isinstance(config, type) and issubclass(config, StageConfig)) or not callable(run):
            raise ConfigError(f"{module.__file__}: a stage module defines Config (a StageConfig) and run(cfg, ctx)")
        return cls(name, config, run, getattr(module, "inputs", _no_inputs), tuple(getattr(module, "positional", ())),
                   bool(getattr(module, "distributed", False)), (module.__doc__ or "").strip())


@dataclass
class Context:
    """What a running stage may use besides its own config."""

    #: directory owned by this stage: outputs, checkpoints, ``done.json``
    out_dir: Path
    #: relative paths in configs are resolved against this (the recipe's directory, or the cwd)
    base_dir: Path = field(default_factory=Path.cwd)
    #: the recipe's named sources (``pipeline.data.SourceConfig``), modality settings and seed
    sources: dict[str, Any] = field(default_factory=dict)
    modalities: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    #: the run directory holding every stage of the recipe
    run_dir: Path | None = None
    progress: bool = True

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"selfsup.{self.out_dir.name}")

    def path(self, value: str | Path) -> Path:
        """A config path: ``{run}`` expands to the run directory, relative paths to ``base_dir``."""
        text = str(value)
        if "{run}" in text:
            if self.run_dir is None:
                raise ConfigError(f"{text}: '{{run}}' only has a meaning inside a recipe run")
            text = text.replace("{run}", str(self.run_dir))
        from pipeline.data.remote import is_url

        if is_url(text):  # s3://, https://, pipe:…: passed through as given (a Path would fold '//')
            return text  # type: ignore[return-value]
        p = Path(text)
        return p if p.is_absolute() else self.base_dir / p

    @classmethod
    def of_recipe(cls, recipe, modalities: dict, recipe_path: str | Path, run_dir: Path, out_dir: Path,
                  progress: bool = True) -> Context:
        """The context of a stage of ``recipe`` (a ``pipeline.runner.Recipe``): paths relative to the
        recipe's file, ``{run}`` = ``run_dir``."""
        return cls(out_dir=out_dir, base_dir=Path(recipe_path).resolve().parent, sources=recipe.sources,
                   modalities=modalities, seed=recipe.seed, run_dir=Path(run_dir).resolve(), progress=progress)

    def modality_config(self, name: str):
        """The recipe's settings of modality ``name`` (None if it gives none), ``{run}`` expanded."""
        cfg = self.modalities.get(name)
        if cfg is None:
            return None
        return cfg.model_copy(update={k: str(self.path(v)) for k, v in cfg if isinstance(v, str) and "{run}" in v})

    def source(self, name: str):
        if name not in self.sources:
            from pipeline.config import _suggest

            raise ConfigError(f"source {name!r} is not defined in the recipe{_suggest(name, list(self.sources))}")
        return self.sources[name]
