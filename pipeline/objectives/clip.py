"""CLIP: align two modalities (image–text, audio–text) by a contrastive loss over the batch.

Each tower's pooled embedding goes through a linear projection to a shared space and is L2
normalized; the loss is ``open_clip.loss.ClipLoss`` with a learnable temperature (logit scale
clamped at ``max_logit_scale``), features gathered across processes with gradient, so every
process contrasts against the global batch.

Gradient accumulation keeps the whole accumulated batch as negatives (``_contrast.StepFeatures``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from pipeline.objectives._contrast import StepFeatures, k_fold, world
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import ObjectiveConfig


class Config(ObjectiveConfig):
    #: the two towers; the first plays open_clip's "image" role, the second its "text" role
    modalities: list[str] = Field(default_factory=lambda: ["image", "text"])
    #: width of the shared space (default: the narrower tower's width)
    embed_dim: int | None = Field(None, ge=1)
    init_temperature: float = Field(0.07, gt=0)
    max_logit_scale: float = Field(100.0, gt=0)
    #: each process scores only its own rows against the global batch (less memory, same gradient)
    local_loss: bool = False

    def reads(self) -> tuple[str, ...]:
        return tuple(self.modalities)

    @field_validator("modalities")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if len(v) != 2 or v[0] == v[1]:
            raise ValueError("CLIP aligns exactly two different modalities, e.g. [image, text]")
        return v


class Objective(Base):
    Config = Config

    def __init__(self, cfg: Config, encoders, name: str = "clip", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        dim = cfg.embed_dim or min(encoders[m].hidden_size for m in cfg.modalities)
        self.proj = nn.ModuleDict({m: nn.Linear(encoders[m].hidden_size, dim, bias=False) for m in cfg.modalities})
        for p in self.proj.values():
            nn.init.normal_(p.weight, std=p.in_features ** -0.5)
        # shape [1], not a scalar: FSDP shards only parameters with at least one dimension
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.init_temperature)))
        self._step = StepFeatures()

    def features(self, batch: dict, m: str) -> torch.Tensor:
        """[B, E] L2-normalized projection of the pooled embedding of modality ``m``."""
        return F.normalize(self.proj[m](self.encoders[m].embed(batch[m])).float(), dim=-1)

    def begin_step(self, micro_batches: list[dict]) -> None:
        self._step.begin(micro_batches, lambda mb: {m: self.features(mb, m) for m in self.modalities})

    def forward(self, batch: dict) -> dict:
        a, b = self.modalities
        live = {m: self.features(batch, m) for m in self.modalities}
        scale = self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale).squeeze(0)
        feats, k, _, last = self._step.whole(batch, live)
        if not last:  # the scale's gradient is the big batch's once, not once per micro-batch; it
            scale = scale.detach()  # flows in the last one, the pass in which DDP synchronizes
        loss = k_fold(self.loss(feats[a], feats[b], scale), k)
        with torch.no_grad():
            hits = (live[a] @ live[b].T).argmax(-1) == torch.arange(len(live[a]), device=live[a].device)
        return {"loss": loss, "logit_scale": scale.detach(), "accuracy": hits.float().mean(),
                "embeddings": {m: v.detach() for m, v in live.items()}}

    def loss(self, fa: torch.Tensor, fb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """open_clip's ClipLoss over this process's rows and, with several processes, everyone's."""
        from open_clip.loss import ClipLoss

        rank, size = world()
        return ClipLoss(local_loss=self.cfg.local_loss, gather_with_grad=True, rank=rank, world_size=size)(fa, fb, scale)
