"""Embed a shard set through a CLIP model into a retrieval index that ``selfsup retrieve`` searches.

    selfsup index --encoders CLIP_DIR --data SHARDS[,SHARDS…] --out INDEX [--batch-size 64]

``CLIP_DIR`` is a CLIP pretrain stage directory (``encoders/`` + ``heads/clip*/``), an exported
stage-layout CLIP directory, or an exported stock ``VisionTextDualEncoderModel`` (its saved image
processor and tokenizer prepare the shards, as they do ``retrieve``'s queries). Every modality of
the pair present in the shards gets a matrix of L2-normalized joint-space embeddings, the sample
keys and where each sample lives (shard, position), so hits can be shown
(``pipeline.retrieval.index``). The index records the CLIP directory, so retrieval loads the same
model to embed its queries.
"""

from __future__ import annotations

import time

from pydantic import Field, field_validator

from pipeline.stage import Context, StageConfig
from stages.validate import shard_inputs


class Config(StageConfig):
    encoders: str = Field(description="CLIP stage directory, exported CLIP directory or stock dual encoder")
    data: list[str] = Field(description="shard directories (with manifest.json), manifests, brace patterns or globs")
    modalities: list[str] | None = Field(default=None, description="modalities to index (default: the pair's)")
    batch_size: int = Field(default=64, ge=1, description="samples embedded at once")
    num_workers: int = Field(default=0, ge=0, description="dataloader workers (stage layout)")

    @field_validator("data", "modalities", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``--data a,b`` arrives as one string."""
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value


def inputs(cfg: Config, ctx: Context) -> list[str]:
    model = ctx.path(cfg.encoders)
    parts = [model / "encoders", model / "heads"] if (model / "heads").is_dir() else [model]
    return shard_inputs(cfg.data, ctx) + [str(p) for p in parts]


def run(cfg: Config, ctx: Context) -> dict:
    from pipeline.config import ConfigError
    from pipeline.evaluation.embed import embed
    from pipeline.retrieval import index
    from pipeline.retrieval.clip import StageClip, load_clip

    t0 = time.time()
    model_dir = ctx.path(cfg.encoders).resolve()
    clip = load_clip(model_dir)  # fails early, naming the directory, if it is no CLIP model
    pair = clip.modalities
    wanted = cfg.modalities or list(pair)
    for m in wanted:
        if m not in pair:
            raise ConfigError(f"modalities: {m!r} is not embedded by the CLIP model {model_dir} ({', '.join(pair)})")
    data = [str(ctx.path(s)) for s in cfg.data]
    if isinstance(clip, StageClip):
        emb = embed(model_dir, data, modalities=wanted, space="clip", label_key=None, batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers, progress=ctx.progress)
    else:  # a stock dual encoder: its own processor and tokenizer, as for the queries
        emb = clip.embed_shards(data, wanted, batch_size=cfg.batch_size, progress=ctx.progress)
    found = {m: f for m, f in emb.features.items() if len(f)}  # rows aligned across modalities and with where
    index.write(ctx.out_dir, {m: f.x for m, f in found.items()}, {m: list(f.keys) for m, f in found.items()},
                {m: emb.where for m in found},
                {"encoders": str(model_dir), "pair": list(pair), "data": data, "space": "clip"})
    counts = {m: len(f) for m, f in found.items()}
    ctx.log.info("index: %s in %.1fs → %s", ", ".join(f"{n} {m}" for m, n in counts.items()), time.time() - t0,
                 ctx.out_dir)
    return {"counts": counts, "seconds": round(time.time() - t0, 2)}

