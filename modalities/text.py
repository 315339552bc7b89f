"""Text: UTF-8 ``txt`` → token ids through a transformers tokenizer → padded ``input_ids`` +
``attention_mask``.

The tokenizer is any directory ``AutoTokenizer.from_pretrained`` loads (``selfsup tokenize``
writes one). It is loaded lazily, once per worker process. Train-time augmentation is a random
window of ``max_length`` tokens over long texts and, where asked (``crop_min`` < 1), a random span
of the text's tokens (a share of them uniform in [``crop_min``, 1]: the span cropping that gives a
short text two different views); evaluation keeps the head. The encoder is a BERT
sized to the tokenizer, whose [MASK] id is its mask token.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from modalities.base import Modality as Base
from modalities.base import ModalityConfig
from pipeline.config import ConfigError
from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.bert import BertEncoder


class TextConfig(ModalityConfig):
    #: directory of a saved tokenizer (``selfsup tokenize`` output); needed to decode, not to encode
    tokenizer: str | None = None
    #: tokens per sample, special tokens included
    max_length: int = 64
    #: pad every batch to ``max_length`` (fixed shapes) instead of to its longest sample
    pad_to_max: bool = False
    #: train only: keep a random contiguous span of at least this share of the tokens (1: all)
    crop_min: float = Field(1.0, gt=0, le=1)


class Modality(Base):
    name = "text"
    extensions = ("txt",)
    Config = TextConfig
    transform_needs_assets = True  # the tokenizer, trained after validation
    augment_keys = frozenset({"crop_min"})
    free_keys = augment_keys | {"tokenizer", "max_length", "pad_to_max"}  # the vocabulary is checked by its size

    def __init__(self, cfg: TextConfig | None = None):
        super().__init__(cfg)
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.cfg.tokenizer)
            self._prefix = [t for t in (self._tok.cls_token_id if self._tok.cls_token_id is not None else self._tok.bos_token_id,) if t is not None]
            self._suffix = [t for t in (self._tok.sep_token_id if self._tok.sep_token_id is not None else self._tok.eos_token_id,) if t is not None]
        return self._tok

    def encode(self, value: Any) -> tuple[str, bytes]:
        if isinstance(value, Path):
            value = value.read_text(encoding="utf-8")
        if not isinstance(value, str):
            raise ValueError(f"cannot encode {type(value).__name__} as text")
        return "txt", value.encode("utf-8")

    def decode(self, data: bytes, ext: str) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{ext} is not UTF-8 ({e.reason} at byte {e.start})") from None

    def transform(self, text: str, rng: random.Random | None) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        room = self.cfg.max_length - len(self._prefix) - len(self._suffix)
        start = rng.randint(0, len(ids) - room) if rng is not None and len(ids) > room else 0
        ids = ids[start : start + room]
        if rng is not None and self.cfg.crop_min < 1 and len(ids) > 1:
            keep = max(1, round(len(ids) * rng.uniform(self.cfg.crop_min, 1.0)))
            first = rng.randint(0, len(ids) - keep)
            ids = ids[first : first + keep]
        return torch.tensor(self._prefix + ids + self._suffix, dtype=torch.long)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        length = self.cfg.max_length if self.cfg.pad_to_max else max(len(x) for x in items)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_assets(self, path: Path) -> tuple[str, ...]:
        self.tokenizer.save_pretrained(str(path))
        return ("tokenizer",)

    def encoder(self, cfg: EncoderConfig | None = None) -> BertEncoder:
        """A BERT sized to this tokenizer's vocabulary (its [MASK] id is the mask token)."""
        return BertEncoder(cfg or EncoderConfig(), self.tokenizer, self.cfg.max_length)


def load_tokenizer(path: str | None):
    if not path:
        raise ConfigError("modalities.text.tokenizer: not set; train one with `selfsup tokenize` and point this at its directory")
    if not Path(path).is_dir():
        raise ConfigError(f"modalities.text.tokenizer: {path}: no such directory")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
