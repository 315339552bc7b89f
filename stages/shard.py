"""Write webdataset shards from a folder, a jsonl manifest, a Hugging Face dataset or existing shards.

    selfsup shard INPUT --out DIR [--max-count 1000] [--compress] [--fields '{image: image, label: cls}']

Output: ``DIR/<prefix>-NNNNNN.tar`` (img2dataset keys: jpg/png/webp, txt, json, cls, flac/wav) and
``DIR/manifest.json`` (per shard: path, sample count, keys, sha256). Runs on every core.
"""

from __future__ import annotations

import shutil
from typing import Literal

from pydantic import Field, field_validator

from pipeline import lock
from pipeline.data.paths import escape
from pipeline.data.remote import is_url, upload
from pipeline.data.sources import SampleEncoder, open_source, unique
from pipeline.data.writer import write_shards
from pipeline.stage import Context, StageConfig

positional = ("input",)


class Config(StageConfig):
    input: str = Field(description="folder, .jsonl file, saved HF dataset, or shards to re-shard")
    format: str = Field("auto", description="auto | folder | jsonl | hf | shards")
    split: str | None = Field(None, description="split of a saved HF DatasetDict")
    fields: dict[str, str | None] | None = Field(
        None, description="input field -> modality (image/text/audio), cls, json or a shard key; others dropped")
    key_field: str | None = Field(None, description="input field holding a unique sample key (default: position)")
    duplicates: Literal["raise", "skip"] = Field(
        "raise", description="items whose key repeats an earlier one: an error, or skipped and counted")
    allow_outside: bool = Field(False, description="jsonl media paths may point outside the jsonl's folder")
    out: str | None = Field(None, description="output folder (default: the stage directory)")
    prefix: str = Field("shard", description="shard file name prefix")
    max_count: int = Field(1000, ge=1, description="samples per shard")
    max_size: float = Field(1e9, gt=0, description="bytes per shard (approximate)")
    compress: bool = Field(False, description="gzip each shard (.tar.gz)")
    workers: int | None = Field(None, ge=1, description="writer processes (default: all cores)")

    @field_validator("prefix")
    @classmethod
    def _file_name(cls, value: str) -> str:
        """The prefix names files inside ``out``: it may not lead out of it."""
        problem = "holds '/'" if "/" in value else escape(value)
        if problem:
            raise ValueError(f"{value!r} {problem}; it must be a file name inside --out")
        return value


def inputs(cfg: Config, ctx: Context) -> list[str]:
    return [str(ctx.path(cfg.input))]


def run(cfg: Config, ctx: Context) -> dict:
    encoder = SampleEncoder(cfg.fields, ctx.modalities, cfg.key_field, allow_outside=cfg.allow_outside)
    source = unique(open_source(ctx.path(cfg.input), cfg.format, cfg.split), encoder, cfg.duplicates, ctx.log)
    out = ctx.path(cfg.out) if cfg.out else ctx.out_dir
    if is_url(str(out)):  # written locally in the stage's folder, then uploaded: shards first, manifest last
        url, out = str(out).rstrip("/"), ctx.out_dir / "upload"
    else:
        url = None
    with lock.hold(out):  # one writer per shard folder, also when a recipe writes it outside its run
        for stale in out.glob(".building-*"):  # left by a writer that was killed; the lock says none runs
            shutil.rmtree(stale, ignore_errors=True)
        manifest = write_shards(source, encoder, out, prefix=cfg.prefix, max_count=cfg.max_count,
                                max_size=cfg.max_size, compress=cfg.compress, workers=cfg.workers,
                                progress=ctx.progress)
    if url is not None:
        upload(out, url, [s["path"] for s in manifest["shards"]])
        shutil.rmtree(out, ignore_errors=True)
        out = url
    keys = sorted({k for s in manifest["shards"] for k in s["keys"]})
    ctx.log.info("wrote %d samples in %d shards to %s (keys: %s)", manifest["total"], len(manifest["shards"]), out,
                 ", ".join(keys))
    return {"out": str(out), "samples": manifest["total"], "shards": len(manifest["shards"]), "keys": keys,
            "skipped_duplicates": getattr(source, "skipped", 0)}
