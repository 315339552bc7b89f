"""What every ``pipeline/objectives/<name>.py`` provides (``Config`` + ``Objective``); the trainer optimizes them through ``pipeline.train.learner.Learner``.

An objective is an ``nn.Module`` that receives the stage's encoders (shared: an image encoder may
serve MAE and CLIP at once), owns its heads and its loss, and maps a batch to
``{"loss": scalar, <metric>: scalar, ..., "embeddings": {modality: [B, D]}}``. The trainer never
asks which objective it runs; objectives with state outside the gradient (EMA teachers) update it
in ``after_step``, and objectives whose loss couples the micro-batches of one optimizer step (CLIP
negatives) see them all in ``begin_step`` first.

Randomness an objective draws (masks) comes from ``noise``: a function of (seed, objective, step,
source, sample key). A sample is masked the same way whatever the batch it lands in, so one process
with the whole batch, two processes with half each, k accumulated micro-batches and a resumed run
all compute the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.batch import SOURCE, step_of

if TYPE_CHECKING:
    from pipeline.encoders.base import Encoder


class ObjectiveConfig(Config):
    """Base of each objective's settings (``objectives: {mae: {...}}`` in a pretrain stage)."""

    #: weight of this objective's loss in the stage's sum
    weight: float = Field(1.0, gt=0)
    #: heads directory an earlier stage wrote (``<stage>/heads/<objective>``): continue from its weights
    init_from: str | None = None

    def reads(self) -> tuple[str, ...]:
        """The modalities (batch keys) the objective reads: the one way to ask it."""
        raise NotImplementedError


class SingleModalityConfig(ObjectiveConfig):
    """Settings of an objective that trains one encoder (MAE, MLM, data2vec)."""

    modality: str

    def reads(self) -> tuple[str, ...]:
        return (self.modality,)


class Objective(nn.Module):
    Config: ClassVar[type[ObjectiveConfig]]
    #: feeds the encoder ``mask=`` (the ViT mask token must then be trained); an objective whose
    #: settings decide it sets it per instance
    uses_mask_token: bool = False

    def __init__(self, cfg: ObjectiveConfig, encoders: dict[str, Encoder], name: str, seed: int = 0):
        super().__init__()
        self.cfg, self.name, self.seed = cfg, name, seed
        for m in self.modalities:
            if m not in encoders:
                raise ConfigError(f"objectives.{name}: needs a {m} encoder; the stage builds {', '.join(encoders) or 'none'}")
        # a plain dict, not a ModuleDict: the encoders belong to the Learner, which saves them once
        self.__dict__["encoders"] = encoders

    @property
    def modalities(self) -> tuple[str, ...]:
        """The batch keys this objective reads (``cfg.reads()``)."""
        return self.cfg.reads()

    def applies(self, batch: dict) -> bool:
        return all(m in batch for m in self.modalities)

    def forward(self, batch: dict) -> dict:
        raise NotImplementedError

    def lr_scales(self) -> dict[int, float]:
        """Learning-rate scale by parameter id (layer-wise decay); parameters not named keep 1."""
        return {}

    def begin_step(self, micro_batches: list[dict]) -> None:
        """Called without gradient before the micro-batches of one optimizer step are run, in order."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step number ``step`` (1-based) of ``total_steps``."""

    def noise(self, batch: dict, n: int) -> torch.Tensor:
        """[B, n] uniform [0, 1): per sample, a function of (seed, objective, step, source, key)."""
        rows = [torch.rand(n, generator=g) for g in self.generators(batch)]
        return torch.stack(rows).to(_device(batch))

    def generators(self, batch: dict) -> list[torch.Generator]:
        from pipeline.data.seeding import hash_int

        step, source = step_of(batch), batch.get(SOURCE, "")
        return [torch.Generator().manual_seed(hash_int(self.seed, self.name, step, source, key) >> 1)
                for key in batch["__key__"]]


def _device(batch: dict) -> torch.device:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, dict):
            return _device(v)
    return torch.device("cpu")
