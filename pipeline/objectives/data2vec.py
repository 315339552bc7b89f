"""data2vec: a student regresses, at masked positions, what an EMA teacher sees without masking.

The student encoder gets the input with masked positions replaced by the mask token (a ViT's
learned vector, or [MASK] for text). The teacher is an exponential moving average of the student,
run on the full input without gradient; its target at each position is the mean of its top-K
layer outputs, each normalized over the positions of its sample (instance norm: per channel,
padding excluded) or over channels (layer norm). The student's last layer is evaluated at the
masked positions only (``rows=``), the only ones the loss reads. The momentum rises linearly from
``ema_start`` to ``ema_end`` over ``ema_steps`` and then stays: a pure function of the step. One
file serves image, text and audio: the modality only decides the encoder.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.encoders.base import rows_of
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import SingleModalityConfig


class Config(SingleModalityConfig):
    modality: str = "image"
    #: fraction of maskable positions hidden from the student (default: 60 % of patches, 15 % of tokens)
    mask_ratio: float | None = Field(None, gt=0, lt=1)
    #: teacher layers averaged into the target (default: the top half)
    top_k: int | None = Field(None, ge=1)
    target_norm: Literal["instance", "layer"] = "instance"
    #: 0: squared error; > 0: smooth L1 with this beta
    loss_beta: float = Field(0.0, ge=0)
    ema_start: float = Field(0.999, ge=0, le=1)
    ema_end: float = Field(0.9999, ge=0, le=1)
    #: steps over which the momentum rises (default: the whole stage)
    ema_steps: int | None = Field(None, ge=1)


def ema_momentum(step: int, start: float, end: float, steps: int) -> float:
    """Teacher momentum after ``step`` optimizer steps: linear from ``start`` to ``end``, then flat."""
    return end if step >= steps else start + (end - start) * step / steps


class Objective(Base):
    Config = Config
    uses_mask_token = True

    def __init__(self, cfg: Config, encoders, name: str = "data2vec", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        enc = encoders[cfg.modality]
        self.teacher = copy.deepcopy(enc).requires_grad_(False).eval()
        self.top_k = min(cfg.top_k or max(1, enc.num_layers // 2), enc.num_layers)
        self.mask_ratio = cfg.mask_ratio or enc.default_mask_ratio
        self.head = nn.Linear(enc.hidden_size, enc.hidden_size)


    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops out: its targets must be deterministic
        return self

    def make_mask(self, batch: dict, maskable: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: each maskable position hidden with probability ``mask_ratio``, and at least
        one per sample that has any (so every sample contributes to the loss)."""
        noise = self.noise(batch, maskable.shape[1]).masked_fill(~maskable, 2.0)  # never pick the unmaskable
        mask = noise < self.mask_ratio
        first = noise.argmin(dim=1, keepdim=True)
        return mask | (torch.zeros_like(mask).scatter_(1, first, True) & maskable)

    @torch.no_grad()
    def targets(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's view: (targets [B, N, D] averaged over the top-K layers, variance of the
        targets across samples and positions — near zero when the teacher has collapsed)."""
        out = self.teacher(x)
        p = out.num_prefix_tokens
        real = out.attention_mask[:, p:].unsqueeze(-1).float() if out.attention_mask is not None else None
        layers = []
        for h in out.hidden_states[-self.top_k:]:
            h = h[:, p:].float()  # [B, N, D]
            if self.cfg.target_norm == "layer":
                h = F.layer_norm(h, h.shape[-1:])
            else:  # instance norm: per sample and channel, over the real positions
                w = real if real is not None else torch.ones_like(h[..., :1])
                count = w.sum(1, keepdim=True).clamp(min=1)
                mean = (h * w).sum(1, keepdim=True) / count
                var = ((h - mean).pow(2) * w).sum(1, keepdim=True) / count
                h = (h - mean) / (var + 1e-5).sqrt()
            layers.append(h)
        y = torch.stack(layers).mean(0)
        return y, y.var(dim=(0, 1)).mean()

    def forward(self, batch: dict) -> dict:
        x = batch[self.cfg.modality]
        enc = self.encoders[self.cfg.modality]
        mask = self.make_mask(batch, enc.maskable(x))  # [B, N]
        # before the teacher: sizing the rows waits for the mask only, not for the teacher's forward
        rows, valid = rows_of(mask, enc.num_prefix_tokens)
        target, target_var = self.targets(x)
        out = enc(x, mask=mask, rows=rows)
        states = out.last_hidden_state  # [B, S, D] at the masked positions
        pred = self.head(states[valid]).float()  # [M, D], in the order of target[mask]
        if self.cfg.loss_beta == 0:
            err = F.mse_loss(pred, target[mask], reduction="none").mean(-1)  # [M]
        else:
            err = F.smooth_l1_loss(pred, target[mask], beta=self.cfg.loss_beta, reduction="none").mean(-1)
        # mean over each sample's masked positions, then over samples: every sample weighs the same,
        # so the loss of a batch is the mean of the losses of its parts (processes, micro-batches)
        counts = mask.sum(1)  # [B]
        per_sample = torch.zeros(len(counts), device=err.device).index_add_(0, mask.nonzero()[:, 0], err)
        loss = (per_sample / counts.clamp(min=1)).sum() / (counts > 0).sum().clamp(min=1)
        return {"loss": loss, "target_var": target_var, "embeddings": {self.cfg.modality: out.pooled.detach()}}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = ema_momentum(step, self.cfg.ema_start, self.cfg.ema_end, self.cfg.ema_steps or total_steps)
        student = self.encoders[self.cfg.modality].state_dict()
        for key, t in self.teacher.state_dict().items():
            if t.is_floating_point():
                t.lerp_(student[key].to(t.dtype), 1 - m)  # t ← m·t + (1−m)·s
