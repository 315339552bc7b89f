"""The evaluation report: ``report.json`` (validated against ``report.schema.json``) and a
self-contained ``report.html`` (figures and media inline as data URIs; no external resources).

Every entry stands beside its baselines: ``random_init`` (the same evaluation on an untrained
encoder), ``raw_input`` (on the baselines of ``pipeline.evaluation.baselines``) and ``chance``.
A number without them is not written; null says a baseline does not apply (no raw input for
retrieval). Median ranks are better when lower; every other metric when higher.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

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
    write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
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
    """Check ``report`` against ``report.schema.json``; a ValueError names the first bad path."""
    import jsonschema

    schema = schema or json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.Draft202012Validator(schema).validate(report)
    except jsonschema.ValidationError as e:
        raise ValueError(f"report.{'.'.join(map(str, e.absolute_path))}: {e.message}") from None


def lower_is_better(metric: str) -> bool:
    return metric.endswith("rank")


def loses(e: dict, baseline: str) -> bool:
    """True where the encoder does not beat ``baseline`` (an absent baseline is never beaten)."""
    b = e["baselines"].get(baseline)
    if b is None:
        return False
    return e["value"] >= b if lower_is_better(e["metric"]) else e["value"] <= b


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader never sees half a report
