"""A batch of real samples for parity checks: the first ``n`` of a shard set, eval transforms."""

from __future__ import annotations

from pathlib import Path


def batch(shards: str | list[str], modalities: dict, n: int = 8, base_dir: str | Path | None = None) -> dict:
    """``modalities``: {name: modality settings}; returns the collated batch of the first ``n`` samples."""
    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader

    src = SourceConfig(shards=shards, modalities=list(modalities))
    cfg = LoaderConfig(batch_size=n, num_workers=0, epochs=1, augment=False)
    loader = StreamingLoader({"parity": src}, cfg, modalities, seed=0, base_dir=Path(base_dir or Path.cwd()))
    return next(iter(loader))
