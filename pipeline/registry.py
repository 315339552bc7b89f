"""Find components by file name: ``modalities/<name>.py`` holds a ``Modality``,
``stages/<name>.py`` a stage (``Config`` + ``run``), ``pipeline/objectives/<name>.py`` an objective,
``pipeline/evaluators/<name>.py`` an evaluator; each package's ``base.py`` holds the contract.

Adding a component is adding one file; nothing else is edited. Modules are imported lazily, so
listing names costs no import of torch-heavy code.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    """Registered names of one kind: file names without ``.py``, except ``base`` (the contract the
    others fulfil) and private files starting with ``_``."""
    try:
        package = importlib.import_module(KINDS[kind])
    except ModuleNotFoundError:
        return ()
    return tuple(sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_") and m.name != "base"))


def module(kind: str, name: str) -> ModuleType:
    if name not in names(kind):
        raise ConfigError(f"unknown {kind} {name!r}{_suggest(name, list(names(kind)))}; known: {', '.join(names(kind))}")
    return importlib.import_module(f"{KINDS[kind]}.{name}")


def stage(name: str):
    """The ``pipeline.stage.Stage`` of ``stages/<name>.py``."""
    from pipeline.stage import Stage

    return Stage.of(module("stage", name))


def summary(kind: str, name: str) -> str:
    """First line of a component's docstring, read from its file without importing it (so that
    listing commands costs no import of torch)."""
    return doc_line(f"{KINDS[kind]}.{name}")


def doc_line(dotted: str) -> str:
    """First paragraph of the docstring of module ``dotted``, on one line, without importing it."""
    import ast

    spec = importlib.util.find_spec(dotted)
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


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
