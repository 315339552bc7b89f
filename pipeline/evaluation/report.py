"""The evaluation report: ``report.json`` (validated against ``report.schema.json``) and a
self-contained ``report.html`` (figures and media inline as data URIs; no external resources).

Every entry stands beside its baselines: ``random_init`` (the same evaluation on an untrained
encoder), ``raw_input`` (on the baselines of ``pipeline.evaluation.baselines``) and ``chance``.
A number without them is not written; null says a baseline does not apply (no raw input for
retrieval). Median ranks are better when lower; every other metric when higher.
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pipeline.evaluation import plots
from pipeline.evaluators.base import Metric

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
BASELINES = ("random_init", "raw_input", "chance")


def entry(metric: Metric, *, baselines: dict, encoder: str, data: str, n_train: int | None,
          seconds: float) -> dict:
    """One report entry from an evaluator's ``Metric`` (its chance fills ``baselines["chance"]``
    unless given)."""
    m = metric.to_json()
    return {"task": m["task"], "metric": m["name"], "value": m["value"], "interval": m["interval"],
            "baselines": {"chance": m["chance"], **baselines}, "encoder": encoder, "data": data,
            "n_train": n_train, "n_test": m["n"], "seconds": float(seconds), "extra": m["extra"]}


def write_report(out_dir: str | Path, entries: list[dict], context: dict) -> dict:
    """Write ``out_dir/report.json`` (atomically) and return it. ``context`` goes under ``runs``:
    what was evaluated (run directories, checkpoints, settings). Raises ValueError naming the entry
    and the key when a baseline is missing or the report breaks the schema."""
    check_baselines(entries)
    report = {"version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "entries": entries, "runs": context}
    report = json.loads(json.dumps(report))  # tuples → lists, and a non-JSON value fails here
    validate(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
    return report


def check_baselines(entries: list[dict]) -> None:
    for i, e in enumerate(entries):
        name = f"entry {i} ({e.get('task')}/{e.get('metric')})"
        if not e.get("baselines"):
            raise ValueError(f"report: {name} has no baselines; give {', '.join(BASELINES)} "
                             "(null where one does not apply)")
        missing = [k for k in BASELINES if k not in e["baselines"]]
        if missing:
            raise ValueError(f"report: {name} lacks baseline {missing[0]!r}; give null where it does not apply")


def validate(report: dict, schema: dict | None = None) -> None:
    """Check ``report`` against the schema: with ``jsonschema`` when installed, else with the small
    checker below (which knows the keywords the schema uses). Raises ValueError naming the path."""
    schema = schema or json.loads(SCHEMA_PATH.read_text())
    try:
        import jsonschema
    except ImportError:
        _check(report, schema, schema, "report")
        return
    try:
        jsonschema.Draft202012Validator(schema).validate(report)
    except jsonschema.ValidationError as e:
        raise ValueError(f"report.{'.'.join(map(str, e.absolute_path))}: {e.message}") from None


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, kind: str) -> bool:
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or float(value).is_integer()
    return isinstance(value, _TYPES[kind])


def _check(value, schema: dict, root: dict, where: str) -> None:
    """A subset of JSON Schema 2020-12: $ref (local), type, const, oneOf, required, properties,
    additionalProperties: false, items, minItems, maxItems, minimum."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return _check(value, node, root, where)
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        raise ValueError(f"{where}: expected {kinds}, got {json.dumps(value)[:60]}")
    if "const" in schema and value != schema["const"]:
        raise ValueError(f"{where}: must be {schema['const']!r}, got {value!r}")
    if "oneOf" in schema:
        passed = sum(_passes(value, s, root, where) for s in schema["oneOf"])
        if passed != 1:
            raise ValueError(f"{where}: matches {passed} of the allowed forms, not exactly one")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        raise ValueError(f"{where}: {value} is below {schema['minimum']}")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            raise ValueError(f"{where}: {len(value)} items, outside {schema.get('minItems')}..{schema.get('maxItems')}")
        for i, item in enumerate(value):
            if "items" in schema:
                _check(item, schema["items"], root, f"{where}.{i}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ValueError(f"{where}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _check(item, props[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise ValueError(f"{where}: unknown key {key!r}; allowed: {', '.join(props)}")


def _passes(value, schema: dict, root: dict, where: str) -> bool:
    try:
        _check(value, schema, root, where)
    except ValueError:
        return False
    return True


def lower_is_better(metric: str) -> bool:
    return metric.endswith("rank")


def loses(e: dict, baseline: str) -> bool:
    """True where the encoder does not beat ``baseline`` (an absent baseline is never beaten)."""
    b = e["baselines"].get(baseline)
    if b is None:
        return False
    return e["value"] >= b if lower_is_better(e["metric"]) else e["value"] <= b


def write_html(out_dir: str | Path, report: dict, *, curves: dict[str, list[dict]] | None = None,
               confusion: dict | None = None, embedding_map: dict | None = None,
               retrieval_examples: list[dict] | None = None) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    curves: stage name → metrics.jsonl rows (loss curves, one row kept per step); confusion:
    {"matrix": [C, C], "labels": C names, "title"} (default: the first entry whose extra holds one);
    embedding_map: {"x": [N, D], "labels": [N], "names": class names, "title"}; retrieval_examples:
    [{"query", "hits": [{"key", "score", "correct", "image_png_bytes" | "audio_bytes" + "mime"}]}].
    """
    from pipeline.evaluation import page

    if confusion is None:
        confusion = next(({"matrix": e["extra"]["confusion"], "labels": e["extra"].get("labels"),
                           "title": f"{e['task']} confusion, {e['encoder']} on {e['data']}"}
                          for e in report["entries"] if "confusion" in e.get("extra", {})), None)
    figures = []
    if (png := plots.loss_curves_png(curves)) is not None:
        figures.append(("Training loss", png))
    if confusion and (png := plots.confusion_png(confusion["matrix"], confusion.get("labels"),
                                                 confusion.get("title", "confusion matrix"))) is not None:
        figures.append(("Confusion matrix", png))
    if embedding_map and (png := plots.embedding_png(embedding_map["x"], embedding_map.get("labels"),
                                                     embedding_map.get("names"),
                                                     embedding_map.get("title", "embedding map"))) is not None:
        figures.append(("Embedding map", png))
    text = page.render(report, figures, retrieval_examples or [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.html", text.encode())
    return out / "report.html"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a report
