"""What every ``modalities/<name>.py`` provides, so the engine never asks which modality it holds.

A modality turns a raw item into shard bytes (``encode``), shard bytes into a decoded item
(``decode``), a decoded item into a per-sample tensor (``transform``: augmented when given a
random generator, deterministic preprocessing otherwise) and a list of those into a batch
(``collate``). Randomness always comes from the generator passed in, which the loader seeds from
(seed, epoch, sample key): a sample looks the same whatever the number of workers or processes,
and after a resume.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import Config

if TYPE_CHECKING:
    import numpy as np

    from pipeline.encoders.base import Encoder, EncoderConfig


class ModalityConfig(Config):
    """Base of each modality's settings (``modalities: {image: {...}}`` in a recipe)."""


class Modality:
    name: ClassVar[str]
    #: shard keys holding this modality, in order of preference when a sample has several
    extensions: ClassVar[tuple[str, ...]]
    Config: ClassVar[type[ModalityConfig]]
    #: ``transform`` needs something a pre-flight check may not have yet (text: a trained tokenizer),
    #: so ``selfsup validate`` checks decoding only
    transform_needs_assets: ClassVar[bool] = False
    #: settings an encoder saved with other values may still be used with (augmentation, assets):
    #: they change neither the weights nor what the features mean (``pipeline.encoders.saved``)
    free_keys: ClassVar[frozenset[str]] = frozenset({"write_format"})
    #: the train-time augmentation among them: a choice of each stage (its ``augment``), never
    #: carried over from the encoder a stage starts from
    augment_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: ModalityConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()

    def encode(self, value: Any) -> tuple[str, bytes]:
        """A raw item (file path, bytes, array, PIL image, str …) → (shard key, bytes)."""
        raise NotImplementedError

    def decode(self, data: bytes, ext: str) -> Any:
        """Shard bytes → decoded item; raises ``ValueError`` saying what is wrong with the bytes."""
        raise NotImplementedError

    def transform(self, item: Any, rng: random.Random | None) -> Any:
        """Decoded item → per-sample tensor; augmented iff ``rng`` is given."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """Per-sample tensors → batch (a tensor, or a dict of tensors)."""
        raise NotImplementedError

    def encoder(self, cfg: EncoderConfig | None = None) -> Encoder:
        """The encoder of this modality's batches (``collate`` output), sized by ``cfg``."""
        raise NotImplementedError

    @staticmethod
    def raw_features(batch: np.ndarray) -> np.ndarray:
        """[B, D] float32 raw-input baseline of a collated batch (a numpy array): the input itself,
        flattened (``pipeline.evaluation.baselines.pixel_features``); a modality whose raw input
        reads better another way says so here."""
        from pipeline.evaluation import baselines

        return baselines.pixel_features(batch)

    def save_assets(self, path: Path) -> tuple[str, ...]:
        """Write what the encoder needs besides its weights into its directory ``path`` (text: the
        tokenizer); returns the settings that now point at that directory."""
        return ()

    def pick(self, sample: dict) -> str | None:
        """The shard key of this modality present in ``sample``, or None."""
        return next((ext for ext in self.extensions if ext in sample), None)
