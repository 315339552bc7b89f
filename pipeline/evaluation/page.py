"""The HTML of ``report.html``: a results table in which every number sits beside its random-init,
raw-input and chance baselines (a baseline the encoder fails to beat is marked), the figures, the
retrieval examples and what was evaluated. One string, its CSS inline, nothing fetched."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipeline.evaluation import plots
from pipeline.evaluation.report import BASELINES, loses, lower_is_better, write_atomic

CSS = """
:root { --fg: #1d232b; --muted: #5d6875; --line: #dde2e8; --bg: #f6f7f9; --bad: #b42318; --bad-bg: #fde8e6;
        --good: #1a7f37; --accent: #2f5fa7; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 60px; }
h1 { margin: 0 0 4px; font-size: 26px; } h2 { margin: 34px 0 12px; font-size: 19px; }
.meta { color: var(--muted); margin-bottom: 16px; }
.chips span { display: inline-block; margin-right: 8px; padding: 3px 10px; border-radius: 12px;
              background: #e8edf4; font-size: 13px; }
.chips .bad { background: var(--bad-bg); color: var(--bad); font-weight: 600; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px; margin-bottom: 16px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
tr.flag td:first-child { box-shadow: inset 4px 0 0 var(--bad); }
td.lose { background: var(--bad-bg) !important; color: var(--bad); font-weight: 600; }
td.value { font-weight: 600; }
.legend { color: var(--muted); font-size: 13px; margin-top: 8px; }
.lose-mark { color: var(--bad); }
figure { margin: 0; } figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; text-align: center; }
.query { font-weight: 600; margin-bottom: 10px; }
.hits { display: flex; flex-wrap: wrap; gap: 12px; }
.hit { width: 180px; border: 2px solid var(--line); border-radius: 6px; padding: 6px; font-size: 12px; }
.hit.ok { border-color: var(--good); } .hit.no { border-color: var(--bad); }
.hit img { width: 100%; height: 140px; object-fit: contain; background: #f0f0f0; image-rendering: pixelated; }
.hit audio { width: 100%; }
.hit .key { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: var(--muted); }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-size: 12.5px; }
"""


def render(report: dict, figures: list[tuple[str, bytes]], examples: list[dict]) -> str:
    entries = report["entries"]
    flagged = sum(any(loses(e, b) for b in BASELINES) for e in entries)
    chips = [f"<span>{len(entries)} results</span>",
             f"<span class='{'bad' if flagged else ''}'>{flagged} at or below a baseline</span>"]
    parts = [f"<h1>Evaluation report</h1><div class='meta'>written {escape(report.get('created', ''))}</div>",
             f"<div class='chips'>{''.join(chips)}</div>", "<h2>Results</h2>", results_table(entries)]
    for title, png in figures:
        parts.append(f"<h2>{escape(title)}</h2><div class='card'><figure>"
                     f"<img alt='{escape(title)}' src='{data_uri(png, 'image/png')}'></figure></div>")
    if examples:
        parts.append("<h2>Retrieval examples</h2>" + "".join(example_card(x) for x in examples))
    parts.append("<h2>What was evaluated</h2><div class='card'><pre>"
                 f"{escape(json.dumps(report.get('runs', {}), indent=2, default=str))}</pre></div>")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Evaluation report</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>")


def results_table(entries: list[dict]) -> str:
    head = ["Task", "Metric", "Encoder", "Data", "Value", "95 % interval", "Random init", "Raw input", "Chance",
            "n train", "n test", "Seconds"]
    rows = []
    # grouped by task, data and encoder; within a group the evaluator's own order (R@1, R@5, R@10)
    for e in sorted(entries, key=lambda e: (e["task"], e["data"], e["encoder"])):
        cells = [f"<td>{escape(e['task'])}</td>",
                 f"<td>{escape(e['metric'])}{' ↓' if lower_is_better(e['metric']) else ''}</td>",
                 f"<td>{escape(e['encoder'])}</td>", f"<td>{escape(e['data'])}</td>",
                 f"<td class='num value'>{fmt(e['value'])}</td>", f"<td class='num'>{interval(e['interval'])}</td>"]
        for b in BASELINES:
            if loses(e, b):
                cells.append(f"<td class='num lose' title='the encoder does not beat {b.replace('_', ' ')}'>"
                             f"▲ {fmt(e['baselines'][b])}</td>")
            else:
                cells.append(f"<td class='num'>{fmt(e['baselines'].get(b))}</td>")
        cells += [f"<td class='num'>{fmt(e['n_train'])}</td>", f"<td class='num'>{fmt(e['n_test'])}</td>",
                  f"<td class='num'>{e['seconds']:.1f}</td>"]
        flag = any(loses(e, b) for b in BASELINES)
        rows.append(f"<tr class='{'flag' if flag else ''}'>{''.join(cells)}</tr>")
    legend = ("<div class='legend'><span class='lose-mark'>▲ red</span>: a baseline at least as good as the "
              "encoder. ↓: lower is better. —: the baseline does not apply. Intervals: 95 % bootstrap "
              "over test samples.</div>")
    return (f"<div class='card scroll'><table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{legend}</div>")


def example_card(example: dict) -> str:
    tiles = []
    for hit in example.get("hits", []):
        if hit.get("image_png_bytes") is not None:
            media = f"<img alt='{escape(hit.get('key', ''))}' src='{data_uri(hit['image_png_bytes'], 'image/png')}'>"
        elif hit.get("audio_bytes") is not None:
            mime = hit.get("mime", "audio/flac")
            media = f"<audio controls preload='none' src='{data_uri(hit['audio_bytes'], mime)}'></audio>"
        else:
            media = ""
        ok = hit.get("correct")
        mark = "✓" if ok else "✗"
        key = escape(hit.get("key", ""))
        tiles.append(f"<div class='hit {'ok' if ok else 'no'}'>{media}<div class='key' title='{key}'>"
                     f"{mark} {key}</div><div>score {fmt(hit.get('score'))}</div></div>")
    return (f"<div class='card'><div class='query'>“{escape(example.get('query', ''))}”</div>"
            f"<div class='hits'>{''.join(tiles)}</div></div>")


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def interval(value) -> str:
    return "—" if value is None else f"{fmt(value[0])} – {fmt(value[1])}"


def write_html(out_dir: str | Path, report: dict, *, curves: dict[str, list[dict]] | None = None,
               confusion: dict | None = None, embedding_map: dict | None = None,
               retrieval_examples: list[dict] | None = None) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    curves: stage name → metrics.jsonl rows (loss curves, one row kept per step); confusion:
    {"matrix": [C, C], "labels": C names, "title"} (default: the first entry whose extra holds one);
    embedding_map: {"x": [N, D], "labels": [N], "names": class names, "title"}; retrieval_examples:
    [{"query", "hits": [{"key", "score", "correct", "image_png_bytes" | "audio_bytes" + "mime"}]}].
    """
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
    text = render(report, figures, retrieval_examples or [])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.html", text.encode())
    return out / "report.html"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def escape(value) -> str:
    return html.escape(str(value), quote=True)
