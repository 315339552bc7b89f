"""One self-contained HTML page of retrieval hits: each hit read back from its shard (by shard and
position, as the index records it) and shown inline — images as thumbnails, sounds as audio
players, texts as text — so the page opens anywhere without the shards."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pipeline import registry
from pipeline.data.shards import ShardError, iter_samples

_MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
         "flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg"}
_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}h2{font-size:1.1em;margin:1.4em 0 .4em}
.hits{display:flex;flex-wrap:wrap;gap:.8em}.hit{border:1px solid #ccc;border-radius:6px;padding:.5em;width:180px}
.hit img{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;background:#f4f4f4}
.hit audio{width:170px}.score{font-weight:bold}.key,.where{font-size:.8em;color:#666;word-break:break-all}
.text{font-size:.9em;margin:.3em 0}"""


def write_page(results: list[dict], out: str | Path) -> Path:
    """``results`` as ``selfsup retrieve --json`` prints them → an HTML file at ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = []
    for r in results:
        cards = "".join(_card(h) for h in r["hits"])
        body.append(f"<h2>{html.escape(r['query'])}</h2><div class='hits'>{cards}</div>")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>retrieval</title><style>{_STYLE}</style>"
                   f"</head><body><h1>Retrieval hits</h1>{''.join(body)}</body></html>\n", encoding="utf-8")
    return out


def _card(hit: dict) -> str:
    sample = _sample(hit["shard"], hit["position"])
    media = ""
    if sample is None:
        media = "<div class='text'>(shard not readable here)</div>"
    else:
        media = _media(sample, hit["modality"])
        text = sample.get("txt")
        if text and hit["modality"] != "text":
            media += f"<div class='text'>{html.escape(text.decode('utf-8', 'replace')[:200])}</div>"
    return (f"<div class='hit'>{media}<div class='score'>{hit['score']:.4f}</div>"
            f"<div class='key'>{html.escape(hit['key'])}</div>"
            f"<div class='where'>{html.escape(Path(hit['shard']).name)} #{hit['position']}</div></div>")


def _media(sample: dict, modality: str) -> str:
    ext = next((e for e in registry.modality(modality).extensions if e in sample), None)
    if ext is None or sample.get(ext) is None:
        return ""
    data = sample[ext]
    if modality == "text":
        return f"<div class='text'>{html.escape(data.decode('utf-8', 'replace')[:300])}</div>"
    uri = f"data:{_MIME.get(ext, 'application/octet-stream')};base64,{base64.b64encode(data).decode()}"
    if modality == "audio":
        return f"<audio controls src='{uri}'></audio>"
    return f"<img src='{uri}' alt='{html.escape(sample['__key__'])}'>"


def _sample(shard: str, position: int) -> dict | None:
    try:
        return next(iter_samples(shard, start=position, stop=position + 1), None)
    except (ShardError, FileNotFoundError):
        return None
