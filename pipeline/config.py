"""Typed, strict configuration: the base model every component's config derives from, YAML
loading, ``key=value`` overrides, and errors a person can act on.

Each component keeps its own ``Config`` beside its code; this module only knows how to load, merge
and explain them. Unknown keys are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A user mistake in a recipe, an override or a command line; the message is one actionable line."""


class Config(BaseModel):
    """Base for every config: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"[a, b]"`` → list, ``"1e-3"`` → 0.001; anything YAML cannot type stays a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string; floats written that way are common
        try:
            return float(value) if any(c in value for c in ".eE") and value[0] in "+-.0123456789" else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str], where: str = "override") -> dict:
    """Apply dotted ``a.b.c=value`` overrides in place. List items are addressed by index or, for
    lists of mappings with a ``name``, by that name (``stages.pretrain.lr=1e-3``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where} {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]), where, create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, dotted, where)] = parse_value(raw)
        else:
            node[last] = parse_value(raw)
    return data


def _list_index(node: list, part: str, dotted: str, where: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise ConfigError(f"{where} {dotted!r}: no item {part!r}{_suggest(part, [n for n in names if n])}")


def _child(node: Any, part: str, dotted: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, dotted, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"{where} {dotted!r}: {part!r} is not a mapping")
    if part not in node:
        if not create:
            raise ConfigError(f"{where} {dotted!r}: unknown key{_suggest(part, list(node))}")
        node[part] = {}
    return node[part]


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls: type[Config], data: dict, where: str) -> Config:
    """Validate ``data`` into ``cls``; the first problem becomes a one-line ``ConfigError``."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, cls, where)) from None


def explain(error: ValidationError, cls: type[BaseModel], where: str) -> str:
    errors = error.errors()
    # a misspelt key is also a missing one; the unknown key is the message that helps
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(cls, err["loc"][:-1])
        return f"{where}: unknown key {key!r}{_suggest(loc[-1], valid)}; valid keys: {', '.join(sorted(valid))}"
    if err["type"] == "missing":
        return f"{where}: missing required key {key!r}"
    if err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
        return f"{where}: {key}: {err['ctx']['error']}"  # a nested config's own message says it all
    return f"{where}: {key}: {err['msg']} (got {json.dumps(err.get('input'), default=str)[:80]})"


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model found by walking ``loc`` through nested models (and the keys
    of ``dict[str, Model]`` fields, which name no field)."""
    model: Any = cls
    in_mapping = False
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            if in_mapping:  # a user-chosen key of a dict of models, e.g. a source's name
                in_mapping = False
                continue
            return []
        model = _model_of(field.annotation)
        in_mapping = get_origin(field.annotation) is dict
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump(cfg: BaseModel) -> dict:
    return json.loads(cfg.model_dump_json())
