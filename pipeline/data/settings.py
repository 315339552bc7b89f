"""The loader's settings: one source (a shard set, what to decode from it, its held-out split),
the local shard cache, and the loader itself (``pipeline.data.loader``); and the error a bad sample
raises."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ByteSize, Field, model_validator

from pipeline.config import Config
from pipeline.data.seeding import hash_int


class SourceConfig(Config):
    """One shard set and what to read from it."""

    shards: str | list[str]
    #: modalities decoded from each sample, e.g. [image, text]
    modalities: list[str] = Field(min_length=1)
    #: shard key of an integer label returned as ``batch["cls"]`` (e.g. ``cls``)
    label: str | None = None
    #: relative sampling weight when several sources are mixed
    weight: float = Field(1.0, gt=0)
    #: share of the samples held out (a validation split), chosen by a hash of each sample's key,
    #: or of the ``holdout_by`` field of its ``json`` (``speaker``: whole voices held out); the
    #: same samples whatever the shards, processes or seed
    holdout: float = Field(0.0, ge=0, lt=1)
    holdout_by: str | None = None
    #: the part read: ``rest`` (training on what is not held out) or ``holdout`` (validating on it)
    part: Literal["rest", "holdout"] = "rest"

    @model_validator(mode="after")
    def _split_needs_a_share(self):
        if not self.holdout and (self.part == "holdout" or self.holdout_by):
            what = "part: holdout" if self.part == "holdout" else "holdout_by"
            raise ValueError(f"{what} needs holdout: the share held out (e.g. 0.1); without it nothing is held out")
        return self

    def wanted(self, sample: dict) -> bool:
        """Whether a raw shard sample belongs to the part this source reads."""
        if not self.holdout:
            return True
        value = sample["__key__"]
        if self.holdout_by is not None:
            try:
                value = json.loads(sample["json"])[self.holdout_by]
            except (KeyError, TypeError, ValueError):
                raise SampleError(f"sample {sample['__key__']!r}: no json field {self.holdout_by!r} "
                                  f"(holdout_by)") from None
        held = hash_int("holdout", str(value)) % 1_000_000 < self.holdout * 1_000_000
        return held == (self.part == "holdout")


class CacheConfig(Config):
    """A local folder that keeps copies of remote shards (``pipeline.data.cache``)."""

    #: folder of the copies, on a local disk; workers and runs on one machine may share it
    dir: str
    #: the most the copies may take (``200GB``, ``1.5GiB`` or bytes); the least recently read go first
    max_bytes: ByteSize = Field(gt=0)


class LoaderConfig(Config):
    batch_size: int = Field(64, ge=1)  # per process
    num_workers: int = Field(2, ge=0)
    #: None streams forever (training runs are measured in steps); N stops after N passes
    epochs: int | None = Field(None, ge=1)
    #: units read concurrently by one stream; more mixes shards better
    interleave: int = Field(4, ge=1)
    augment: bool = True
    #: augmented views of each sample (joint-embedding objectives compare them); view 0 is
    #: ``batch[<modality>]`` as with one view, views 1… are ``batch["__views__"][<modality>]["1"]``…,
    #: each drawn from (seed, epoch, key, view). Needs ``augment``.
    views: int = Field(1, ge=1)
    drop_last: bool = False
    on_error: Literal["raise", "skip"] = "raise"
    #: directory receiving one jsonl per process listing every consumed sample (audits, tests)
    ledger: str | None = None
    prefetch_factor: int = Field(4, ge=1)
    #: fsspec arguments per protocol for URL shards, e.g. ``{s3: {endpoint_url: …, anon: true}}``;
    #: unset, each store reads its own environment and config files (secrets are redacted in run dirs)
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: samples of each open remote unit fetched ahead in the background (0: none); local shards never
    read_ahead: int = Field(64, ge=0)
    #: keep remote shards in a bounded local folder, e.g. ``{dir: /scratch/shards, max_bytes: 200GB}``:
    #: later epochs and runs read them from disk; None reads the store every time
    cache: CacheConfig | None = None


    @model_validator(mode="after")
    def _views_need_augmentation(self):
        if self.views > 1 and not self.augment:
            raise ValueError("views: more than one view needs augment: true (unaugmented views are all the same)")
        return self


class SampleError(RuntimeError):
    """A sample that cannot be used; the message names the shard, the key and the cause."""
