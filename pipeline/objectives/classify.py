"""Classification: cross-entropy of a small head over one encoder, on the sample label (``batch["cls"]``).

The head reads exactly what the stock transformers classifier of the encoder's family reads, so
the trained model is saved as that stock class with nothing approximated
(``pipeline.evaluators.finetune``): for a ViT, the final-norm [CLS] state → linear
(``ViTForImageClassification``); for a BERT, BERT's pooler (dense + tanh over [CLS]) → linear
(``BertForSequenceClassification``). The encoder is frozen (a probe with a trainable head) or
fine-tuned with layer-wise learning-rate decay: layer ``i`` of ``L`` trains at
``layer_decay ** (L - i)`` times the head's rate, the embeddings at ``layer_decay ** (L + 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.config import ConfigError
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import SingleModalityConfig


class Config(SingleModalityConfig):
    modality: str = "image"
    #: the class ids the labels take (sorted); the head has one output per id
    classes: list[int] = Field(min_length=2)
    #: train the head only (True) or the encoder too
    frozen: bool = True
    #: layer-wise learning-rate decay when the encoder trains (1: the same rate everywhere)
    layer_decay: float = Field(0.75, gt=0, le=1)
    #: label smoothing of the cross-entropy
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Objective(Base):
    Config = Config

    def __init__(self, cfg: Config, encoders, name: str = "classify", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        if sorted(set(cfg.classes)) != list(cfg.classes):
            raise ConfigError(f"objectives.{name}.classes: must be sorted and distinct")
        enc = encoders[cfg.modality]
        d = enc.hidden_size
        self.register_buffer("classes", torch.tensor(cfg.classes), persistent=False)
        #: BERT's pooler for token encoders (its stock classifier reads the pooler output), none for ViT
        self.pooler = nn.Sequential(nn.Linear(d, d), nn.Tanh()) if enc.has_tokenizer else nn.Identity()
        self.classifier = nn.Linear(d, len(cfg.classes))
        if cfg.frozen:
            enc.requires_grad_(False)

    def features(self, batch: dict) -> torch.Tensor:
        """[B, D]: the stock classifier's input, the [CLS] state (through BERT's pooler for text)."""
        enc = self.encoders[self.cfg.modality]
        if self.cfg.frozen:
            enc.eval()  # no dropout in a frozen encoder
            with torch.no_grad():
                out = enc(batch[self.cfg.modality])
        else:
            out = enc(batch[self.cfg.modality])
        return self.pooler(out.last_hidden_state[:, 0])

    def logits(self, batch: dict) -> torch.Tensor:
        """[B, C] scores, column c for class id ``classes[c]``."""
        return self.classifier(self.features(batch))

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Class ids [B] → column positions [B]; an id outside ``classes`` is an error naming it."""
        pos = torch.searchsorted(self.classes, labels).clamp(max=len(self.classes) - 1)
        bad = self.classes[pos] != labels
        if bad.any():
            raise ConfigError(f"objectives.{self.name}: label {int(labels[bad][0])} is not among the "
                              f"{len(self.classes)} classes the head was built for")
        return pos

    def forward(self, batch: dict) -> dict:
        if "cls" not in batch:
            raise ConfigError(f"objectives.{self.name}: the batch has no label; set the source's `label` key")
        feats = self.features(batch)
        logits = self.classifier(feats)
        target = self.targets(batch["cls"].to(logits.device))
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy, "embeddings": {self.cfg.modality: feats.detach()}}

    def lr_scales(self) -> dict[int, float]:
        if self.cfg.frozen or self.cfg.layer_decay == 1:
            return {}
        enc = self.encoders[self.cfg.modality]
        layers = list(enc.layers)
        n = len(layers)
        scales = {id(p): self.cfg.layer_decay ** (n + 1) for p in enc.parameters()}  # embeddings and the rest
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                scales[id(p)] = self.cfg.layer_decay ** (n - i)
        for name, p in enc.model.named_parameters():  # the final norm sits with the head
            if name.startswith("layernorm."):
                scales[id(p)] = 1.0
        return scales
