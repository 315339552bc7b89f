"""Search an index made by ``selfsup index`` with text, an image or a sound.

    selfsup retrieve INDEX "a red apple" [-k 5]          text → the other modality of the pair
    selfsup retrieve INDEX --image cat.png --target text  by example
    selfsup retrieve INDEX --audio word.flac
    selfsup retrieve INDEX --queries prompts.txt --json   one text query per line, in batches
    selfsup retrieve INDEX "a red apple" --html hits.html thumbnails and audio players

Scores are cosine similarities in the CLIP space. The index names the CLIP model that built it,
which embeds the queries. ``--json`` prints a list of ``{"query", "hits": [{"key", "score",
"modality", "shard", "position"}]}``, described by ``retrieve.schema.json`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError

SCHEMA = Path(__file__).with_name("retrieve.schema.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index directory (selfsup index --out)")
    p.add_argument("text", nargs="?", help="a text query")
    p.add_argument("-k", type=int, default=5, help="hits per query (default: 5)")
    p.add_argument("--image", action="append", metavar="FILE", help="query by an image file (repeatable)")
    p.add_argument("--audio", action="append", metavar="FILE", help="query by an audio file (repeatable)")
    p.add_argument("--queries", metavar="FILE", help="text queries, one per line")
    p.add_argument("--target", choices=("image", "text", "audio"), help="modality searched (default: the other one)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON (retrieve.schema.json)")
    p.add_argument("--html", metavar="OUT", help="also write a page showing the hits")
    p.add_argument("--backend", choices=("exact", "faiss"), default="exact", help="search backend (default: exact)")
    p.add_argument("--batch-size", type=int, default=64, help="queries embedded at once (default: 64)")


def run(args) -> int:
    from pipeline.retrieval.index import Index

    if args.k < 1:
        raise ConfigError(f"-k {args.k}: must be at least 1")
    index = Index(args.index, backend=args.backend)
    modality, queries, labels = _queries(args)
    target = args.target or _other(index, modality)
    index.check(target)
    pair = index.info.get("pair") or index.modalities
    if modality not in pair:
        raise ConfigError(f"{index.info['encoders']}: this CLIP model embeds {' and '.join(pair)}, not {modality} queries")
    clip = _model(index)
    if modality not in clip.modalities:
        raise ConfigError(f"{index.info['encoders']}: this CLIP model embeds {' and '.join(clip.modalities)}, "
                          f"not {modality} queries")
    results = []
    for start in range(0, len(queries), args.batch_size):
        batch = queries[start : start + args.batch_size]
        try:  # the model decodes example files with its own settings (sample rate, colour mode)
            features = clip.encode(modality, batch)
        except (ValueError, OSError) as e:  # a file that is no image / sound names itself
            raise ConfigError(f"--{modality}: {' '.join(str(e).split())}") from None
        hits = index.search(features.numpy(), target, args.k)
        results += [_hits(index, target, labels[start + i], hits.scores[i], hits.rows[i]) for i in range(len(batch))]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['query']}")
            for h in r["hits"]:
                print(f"  {h['score']:.4f}  {h['key']}  ({h['modality']}, {h['shard']}#{h['position']})")
    if args.html:
        from pipeline.retrieval.page import write_page

        print(f"wrote {write_page(results, args.html)}", file=sys.stderr)
    return 0


def _queries(args) -> tuple[str, list, list[str]]:
    """(query modality, the raw queries, how each is named in the output); exactly one kind."""
    kinds = [k for k, v in (("text", args.text), ("queries", args.queries), ("image", args.image),
                            ("audio", args.audio)) if v]
    if len(kinds) != 1:
        raise ConfigError("give one kind of query: a text, --queries FILE, --image FILE or --audio FILE"
                          + (f" (got {', '.join(kinds)})" if kinds else ""))
    kind = kinds[0]
    if kind == "text":
        return "text", [args.text], [args.text]
    if kind == "queries":
        file = Path(args.queries)
        if not file.is_file():
            raise ConfigError(f"--queries {file}: no such file")
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--queries {file}: no queries (one per line)")
        return "text", lines, lines
    files = args.image if kind == "image" else args.audio
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"--{kind} {f}: no such file")
    return kind, [Path(f) for f in files], list(files)


def _other(index, modality: str) -> str:
    pair = index.info.get("pair") or index.modalities
    others = [m for m in pair if m != modality]
    if not others:
        raise ConfigError(f"{index.path}: no modality other than {modality} to search; pass --target")
    return others[0]


def _model(index):
    from transformers.utils import logging as hf_logging

    from pipeline.retrieval.clip import load_clip

    hf_logging.disable_progress_bar()  # the hits are the output; weight-loading bars would bury them
    path = Path(index.info["encoders"])
    if not path.is_dir():
        raise ConfigError(f"{index.path}/index.json: the CLIP model {path} that built this index is gone")
    return load_clip(path)


def _hits(index, target: str, query: str, scores, rows) -> dict:
    keys = index.keys(target)
    hits = []
    for s, r in zip(scores.tolist(), rows.tolist()):
        shard, position = index.place(target, r)
        hits.append({"key": keys[r], "score": round(float(s), 6), "modality": target, "shard": shard,
                     "position": position})
    return {"query": str(query), "hits": hits}
