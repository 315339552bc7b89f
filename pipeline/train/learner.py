"""The ``Learner``: a stage's encoders and objectives as the one module the trainer optimizes."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.data.batch import modalities_in
from pipeline.encoders.base import Encoder
from pipeline.objectives.base import Objective


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
            have = modalities_in(batch)
            raise ConfigError(f"a batch of source {batch.get('__source__')!r} holds {have}: no objective of this "
                              f"stage trains on it; drop the source or add an objective for it")
        return {"loss": total, "metrics": metrics, "embeddings": embeddings}

    def lr_scales(self) -> dict[int, float]:
        """Learning-rate scale per parameter id that the objectives ask for (layer-wise decay)."""
        out: dict[int, float] = {}
        for obj in self.objectives.values():
            out.update(obj.lr_scales())
        return out

    def begin_step(self, micro_batches: list[dict]) -> None:
        with torch.no_grad():
            for obj in self.objectives.values():
                obj.begin_step([mb for mb in micro_batches if obj.applies(mb)])

    def after_step(self, step: int, total_steps: int) -> None:
        for obj in self.objectives.values():
            obj.after_step(step, total_steps)
