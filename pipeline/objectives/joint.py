"""Joint embedding: augmented views of one sample map to nearby points, views of different samples
to distant ones (SimCLR's NT-Xent loss), for any one modality.

The loader draws the views (``loader.views: 2`` or more, each a function of (seed, epoch, key,
view)): crops and flips of an image, crops and time shifts of a sound, windows of a text. On top of
that, ``mask_ratio`` hides a share of each view's positions behind the encoder's mask token (drawn
from the objective's noise, per view), the augmentation that works for every modality, text
included, where short texts have a single window (without it, or encoder ``dropout`` as SimCSE
uses, a short text's two views are the same and the task is trivial).

Each view's pooled embedding (the encoder's ``pooling``) goes through a projection head (linear,
LayerNorm, GELU, linear: a LayerNorm rather than SimCLR's BatchNorm, so that a batch split over
processes or micro-batches computes what the whole batch does) and is L2 normalized. For every
ordered pair of views (a, b), each sample's view a must pick its view b among the views a and b of
every sample of the step (the 2N − 1 others), at temperature ``temperature``; the loss is the mean
over pairs. The negatives are the whole step's: every process and micro-batch
(``_contrast``; exactly the big batch's gradient with ``dropout: 0``). The encoder keeps the representation before the head, as SimCLR does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.config import ConfigError
from pipeline.objectives._contrast import StepFeatures, gather, k_fold
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import SingleModalityConfig

VIEWS = "__views__"


class Config(SingleModalityConfig):
    modality: str = "image"
    #: softmax temperature of the NT-Xent loss
    temperature: float = Field(0.2, gt=0)
    #: width of the projection head's hidden layer and of its output
    hidden_dim: int = Field(1024, ge=1)
    proj_dim: int = Field(128, ge=1)
    #: share of each view's positions put behind the mask token (0: none)
    mask_ratio: float = Field(0.0, ge=0, lt=1)


class Objective(Base):
    Config = Config

    def __init__(self, cfg: Config, encoders, name: str = "joint", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        d = encoders[cfg.modality].hidden_size
        self.head = nn.Sequential(nn.Linear(d, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim), nn.GELU(),
                                  nn.Linear(cfg.hidden_dim, cfg.proj_dim))
        self._step = StepFeatures()
        self.uses_mask_token = cfg.mask_ratio > 0  # the Learner trains the mask token only if it is put in

    def views(self, batch: dict) -> list:
        m = self.cfg.modality
        extra = batch.get(VIEWS, {}).get(m)
        if not extra:
            raise ConfigError(f"objectives.{self.name}: compares views of each sample, but the batch holds one "
                              f"{m} view; set loader.views: 2 (or more) with loader.augment: true")
        return [batch[m], *(extra[str(v)] for v in range(1, len(extra) + 1))]

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """{view index: [B, E] normalized projections}, and ``"pooled"``: view 0's embedding."""
        enc = self.encoders[self.cfg.modality]
        views, out = self.views(batch), {}
        masks = self._masks(batch, views) if self.cfg.mask_ratio > 0 else [None] * len(views)
        for v, (x, mask) in enumerate(zip(views, masks)):
            pooled = enc(x, mask=mask).pooled if mask is not None else enc.embed(x)
            out[str(v)] = F.normalize(self.head(pooled).float(), dim=-1)
            if v == 0:
                out["pooled"] = pooled
        return out

    def _masks(self, batch: dict, views: list) -> list[torch.Tensor]:
        """Per view [B, N] bool: each maskable position hidden with probability ``mask_ratio``."""
        enc = self.encoders[self.cfg.modality]
        masks = []
        for v, x in enumerate(views):
            maskable = enc.maskable(x)
            noise = self.noise({**batch, "__key__": [f"{k}#{v}" for k in batch["__key__"]]}, maskable.shape[1])
            masks.append((noise < self.cfg.mask_ratio) & maskable)
        return masks

    def begin_step(self, micro_batches: list[dict]) -> None:
        self._step.begin(micro_batches, lambda mb: {k: v for k, v in self.features(mb).items() if k != "pooled"})

    def forward(self, batch: dict) -> dict:
        live = self.features(batch)
        pooled = live.pop("pooled")
        feats, k, _, _ = self._step.whole(batch, live)
        loss, hits = self.loss([feats[str(v)] for v in range(len(live))])
        return {"loss": k_fold(loss, k), "accuracy": hits,
                "embeddings": {self.cfg.modality: pooled.detach()}}

    def loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent of this process's rows of the step (``views``: each [n, E], every micro-batch's)
        against every process's: (loss, share of those rows whose positive scored highest). Every
        micro-batch pass scores all of the step's rows, so that the live rows get their gradient
        as negatives of the others too."""
        n = len(views[0])
        everyone = [gather(z) for z in views]
        offset = everyone[0][1]  # this process's first row in the gathered batch
        views = [z for z, _ in everyone]
        total, hits, pairs = 0.0, 0.0, 0
        rows = torch.arange(offset, offset + n, device=views[0].device)
        big = len(views[0])
        for a, za in enumerate(views):
            for b, zb in enumerate(views):
                if a == b:
                    continue
                q = za[rows]  # [n, E]
                logits = torch.cat([q @ za.T, q @ zb.T], dim=1) / self.cfg.temperature  # [n, 2N]
                logits[torch.arange(n, device=logits.device), rows] = float("-inf")  # a view is not its own positive
                target = rows + big
                total = total + F.cross_entropy(logits, target)
                hits = hits + (logits.argmax(1) == target).float().mean().detach()
                pairs += 1
        return total / pairs, hits / pairs

