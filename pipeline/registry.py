"""Find components by file name: ``modalities/<name>.py`` holds a ``Modality``,
``stages/<name>.py`` a stage (``Config`` + ``run``), ``pipeline/objectives/<name>.py`` an objective.

Adding a component is adding one file; nothing else is edited. Modules are imported lazily, so
listing names costs no import of torch-heavy code.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from pipeline.config import ConfigError, _suggest

KINDS = {
    "modality": "modalities",
    "stage": "stages",
    "objective": "pipeline.objectives",
    "evaluator": "pipeline.evaluators",
}


@cache
def names(kind: str) -> tuple[str, ...]:
    """Registered names of one kind: file names without ``.py``. Files starting with ``_`` are private,
    and a module named ``base`` holds a kind's shared contract (``pipeline/evaluators/base.py``), not a
    component, so neither is listed."""
    try:
        package = importlib.import_module(KINDS[kind])
    except ModuleNotFoundError:
        return ()
    found = (m.name for m in pkgutil.iter_modules(package.__path__))
    return tuple(sorted(name for name in found if not name.startswith("_") and name != "base"))


def module(kind: str, name: str) -> ModuleType:
    if name not in names(kind):
        raise ConfigError(f"unknown {kind} {name!r}{_suggest(name, list(names(kind)))}; known: {', '.join(names(kind))}")
    return importlib.import_module(f"{KINDS[kind]}.{name}")


@cache
def modality(name: str):
    """The ``Modality`` class of ``modalities/<name>.py``."""
    return module("modality", name).Modality


def modality_for_extension(ext: str) -> str | None:
    """Which registered modality stores its data under the shard key ``ext`` (``png`` → ``image``)."""
    for name in names("modality"):
        if ext in modality(name).extensions:
            return name
    return None
