"""What every ``pipeline/objectives/<name>.py`` provides, and the ``Learner`` the trainer optimizes.

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

if TYPE_CHECKING:
    from pipeline.encoder import Encoder


class ObjectiveConfig(Config):
    """Base of each objective's settings (``objectives: {mae: {...}}`` in a pretrain stage)."""

    #: weight of this objective's loss in the stage's sum
    weight: float = Field(1.0, gt=0)


class Objective(nn.Module):
    Config: ClassVar[type[ObjectiveConfig]]
    #: feeds the encoder ``mask=`` (the ViT mask token must then be trained)
    uses_mask_token: ClassVar[bool] = False

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
        """The batch keys this objective reads."""
        raise NotImplementedError

    def applies(self, batch: dict) -> bool:
        return all(m in batch for m in self.modalities)

    def forward(self, batch: dict) -> dict:
        raise NotImplementedError

    def begin_step(self, micro_batches: list[dict]) -> None:
        """Called without gradient before the micro-batches of one optimizer step are run, in order."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimizer step number ``step`` (1-based) of ``total_steps``."""

    def noise(self, batch: dict, n: int) -> torch.Tensor:
        """[B, n] uniform [0, 1): per sample, a function of (seed, objective, step, source, key)."""
        rows = [torch.rand(n, generator=g) for g in self.generators(batch)]
        return torch.stack(rows).to(_device(batch))

    def generators(self, batch: dict) -> list[torch.Generator]:
        from pipeline.seeding import hash_int

        step, source = batch.get("__step__", 0), batch.get("__source__", "")
        return [torch.Generator().manual_seed(hash_int(self.seed, self.name, step, source, key) >> 1)
                for key in batch["__key__"]]


class Learner(nn.Module):
    """The encoders of a stage and its objectives: the one module the trainer optimizes.

    ``forward(batch)`` sums ``weight × loss`` over the objectives that apply to the batch (a mixture
    of sources hands each objective only batches holding its modalities)."""

    def __init__(self, encoders: dict[str, Encoder], objectives: dict[str, Objective]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.objectives = nn.ModuleDict(objectives)
        for m, enc in encoders.items():
            token = enc.mask_token
            if token is not None:  # trained only if some objective puts it in
                token.requires_grad_(any(o.uses_mask_token and m in o.modalities for o in objectives.values()))

    @property
    def _no_split_modules(self) -> list[str]:
        """Class names of the transformer layers (encoders' and objectives' ``blocks``): the units
        Accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` shards when its config names no classes."""
        layers = [*(layer for enc in self.encoders.values() for layer in enc.layers),
                  *(block for obj in self.objectives.values() for block in getattr(obj, "blocks", ()))]
        return sorted({type(layer).__name__ for layer in layers})

    def forward(self, batch: dict) -> dict:
        total, metrics, embeddings = None, {}, {}
        for name, obj in self.objectives.items():
            if not obj.applies(batch):
                continue
            out = dict(obj(batch))
            loss = out.pop("loss")
            embeddings.update(out.pop("embeddings", {}))
            metrics[f"{name}/loss"] = loss.detach()
            metrics.update({f"{name}/{k}": torch.as_tensor(v).detach() for k, v in out.items()})
            total = loss * obj.cfg.weight if total is None else total + loss * obj.cfg.weight
        if total is None:
            have = sorted(k for k in batch if not k.startswith("__") and k != "cls")
            raise ConfigError(f"a batch of source {batch.get('__source__')!r} holds {have}: no objective of this "
                              f"stage trains on it; drop the source or add an objective for it")
        return {"loss": total, "metrics": metrics, "embeddings": embeddings}

    def begin_step(self, micro_batches: list[dict]) -> None:
        with torch.no_grad():
            for obj in self.objectives.values():
                obj.begin_step([mb for mb in micro_batches if obj.applies(mb)])

    def after_step(self, step: int, total_steps: int) -> None:
        for obj in self.objectives.values():
            obj.after_step(step, total_steps)


def _device(batch: dict) -> torch.device:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, dict):
            return _device(v)
    return torch.device("cpu")
