"""MLM: BERT's masked language modelling on the text encoder.

Masking is transformers' ``DataCollatorForLanguageModeling`` (15 % of the real, non-special
tokens; of those 80 % become [MASK], 10 % a random token, 10 % stay), run per sample with that
sample's generator (``Objective.noise``). The prediction head is BERT's (dense + GELU + LayerNorm)
with the output projection tied to the encoder's input embeddings, so it adds no vocabulary-sized
matrix. Only the selected positions are computed past the attention of the last layer: the
encoder's last layer runs its queries and MLP there alone (``rows=``), and logits are computed there
alone, not over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.config import ConfigError
from pipeline.encoders.base import rows_of
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import SingleModalityConfig


class Config(SingleModalityConfig):
    modality: str = "text"
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    #: of the selected tokens: share replaced by [MASK], share by a random token (the rest stay)
    mask_replace_prob: float = Field(0.8, ge=0, le=1)
    random_replace_prob: float = Field(0.1, ge=0, le=1)


class Objective(Base):
    Config = Config

    def __init__(self, cfg: Config, encoders, name: str = "mlm", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        from transformers import DataCollatorForLanguageModeling
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        enc = encoders[cfg.modality]
        if not enc.has_tokenizer:
            raise ConfigError(f"objectives.{name}.modality: {cfg.modality} is not a token encoder; MLM trains text")
        if cfg.mask_replace_prob + cfg.random_replace_prob > 1:
            raise ConfigError(f"objectives.{name}: mask_replace_prob + random_replace_prob must be at most 1")
        self.collator = DataCollatorForLanguageModeling(
            enc.tokenizer, mlm_probability=cfg.mlm_probability, mask_replace_prob=cfg.mask_replace_prob,
            random_replace_prob=cfg.random_replace_prob)
        self.transform = BertPredictionHeadTransform(enc.model.config)
        self.bias = nn.Parameter(torch.zeros(enc.model.config.vocab_size))


    def mask(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids with masking applied, labels: original id at selected positions, -100 elsewhere)."""
        inputs = batch[self.cfg.modality]
        special = ~self.encoders[self.cfg.modality].maskable(inputs).cpu()
        ids = inputs["input_ids"].cpu()
        masked, labels = [], []
        for i, g in enumerate(self.generators(batch)):
            self.collator.generator = g  # this sample's draws only: independent of the batch around it
            m, lab = self.collator.torch_mask_tokens(ids[i : i + 1].clone(), special[i : i + 1])
            masked.append(m)
            labels.append(lab)
        self.collator.generator = None
        device = inputs["input_ids"].device
        return torch.cat(masked).to(device), torch.cat(labels).to(device)

    def forward(self, batch: dict) -> dict:
        inputs = batch[self.cfg.modality]
        enc = self.encoders[self.cfg.modality]
        ids, labels = self.mask(batch)
        selected = labels != -100  # [B, L]
        rows, valid = rows_of(selected)
        out = enc({**inputs, "input_ids": ids}, rows=rows)
        states = out.last_hidden_state  # [B, S, D]
        h = self.transform(states[valid])  # [M, D], in the order of labels[selected]
        logits = F.linear(h, enc.model.embeddings.word_embeddings.weight, self.bias)  # [M, V], tied
        target = labels[selected]
        count = max(1, int(target.numel()))  # a batch may, rarely, select nothing: loss 0, not NaN
        loss = F.cross_entropy(logits.float(), target, reduction="sum") / count
        accuracy = (logits.argmax(-1) == target).float().sum() / count
        return {"loss": loss, "accuracy": accuracy, "embeddings": {self.cfg.modality: out.pooled.detach()}}
