"""Model cards: the README.md of every exported directory (what it is, how to load it, the data and
licences it was trained on, the evaluation figures beside their baselines, the recipe)."""

from __future__ import annotations

import json
from pathlib import Path


def sources(base: Path) -> str:
    """The starter's ``SOURCES.md`` (origin and licence of each data set), if the run used it."""
    for candidate in (base / "data" / "starter" / "SOURCES.md", base.parent / "data" / "starter" / "SOURCES.md"):
        if candidate.is_file():
            return candidate.read_text()
    return "See the recipe's `sources` for where the training data came from and its licence.\n"


def evaluation(run_dir: Path | None, encoder: str | None = None) -> str:
    """Evaluation figures and baselines from ``<run>/evaluate/report.json`` (schema
    ``pipeline/evaluation/report.schema.json``), the rows of ``encoder`` when given."""
    report = run_dir / "evaluate" / "report.json" if run_dir else None
    if not report or not report.is_file():
        return "No evaluation report in this run (`selfsup evaluate` writes one).\n"
    entries = json.loads(report.read_text()).get("entries", [])
    if encoder:
        entries = [e for e in entries if encoder in str(e.get("encoder", ""))] or entries
    lines = ["| task | metric | encoder | data | value | random init | raw input | chance |", "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        b = e.get("baselines", {})
        lines.append("| " + " | ".join([str(e.get("task")), str(e.get("metric")), str(e.get("encoder")), str(e.get("data")),
                                        *(_num(x) for x in (e.get("value"), b.get("random_init"), b.get("raw_input"),
                                                             b.get("chance")))]) + " |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def write(path: Path, title: str, usage: str, recipe: str | None, base: Path, run_dir: Path | None,
          parity: dict | None = None, encoder: str | None = None) -> None:
    text = [f"# {title}\n", usage.strip() + "\n"]
    if parity:
        text.append("## Parity with the training-time modules\n\nMax abs difference on real samples (fp32): "
                    + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()) + "\n")
    text += ["## Evaluation\n", evaluation(run_dir, encoder), "## Training data and licences\n", sources(base)]
    if recipe:
        text += ["## Recipe\n", "```yaml\n" + recipe.rstrip() + "\n```\n"]
    (path / "README.md").write_text("\n".join(text))
