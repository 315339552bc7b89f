"""MAE: hide most patches, encode the visible ones only, reconstruct the hidden ones.

Image pixels or audio log-mel patches (Audio-MAE) alike: anything whose encoder has patches. The
encoder runs on the kept 25 % (``keep=``), which is where MAE's speed comes from; a light decoder
sees the encoded patches plus a learned mask token at every hidden position and predicts the
patch values, each patch normalized by its own mean and variance (``norm_pix_loss``). The loss is
the mean squared error over hidden patches only, so the decoder's last block and its prediction
head run at the hidden patches alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.config import ConfigError
from pipeline.encoders.base import take
from pipeline.objectives.base import Objective as Base
from pipeline.objectives.base import SingleModalityConfig


class Config(SingleModalityConfig):
    modality: str = "image"
    #: fraction of patches hidden from the encoder
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_width: int = 128
    decoder_layers: int = 2
    decoder_heads: int = 4
    #: regress each patch normalized by its own mean and variance (MAE's better-probing target)
    norm_pix_loss: bool = True


class Objective(Base):
    Config = Config

    def __init__(self, cfg: Config, encoders, name: str = "mae", seed: int = 0):
        super().__init__(cfg, encoders, name, seed)
        enc = encoders[cfg.modality]
        if not enc.has_patches:
            raise ConfigError(f"objectives.{name}.modality: {cfg.modality} has no patches to reconstruct; "
                              f"MAE trains patch encoders (image, audio), use mlm or data2vec for text")
        if cfg.decoder_width % cfg.decoder_heads:
            raise ConfigError(f"objectives.{name}.decoder_width: {cfg.decoder_width} is not divisible by "
                              f"decoder_heads {cfg.decoder_heads}")
        w, n = cfg.decoder_width, enc.num_patches
        self.num_keep = max(1, round(n * (1 - cfg.mask_ratio)))
        self.embed = nn.Linear(enc.hidden_size, w)
        self.mask_token = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + n, w) * 0.02)  # [CLS] + grid, learned
        self.blocks = nn.ModuleList(DecoderBlock(w, cfg.decoder_heads) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.head = nn.Linear(w, enc.patch_size ** 2 * enc.channels)
        for m in self.modules():  # MAE's initialization of its decoder
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


    def forward(self, batch: dict) -> dict:
        x = batch[self.cfg.modality]
        enc = self.encoders[self.cfg.modality]
        order = self.noise(batch, enc.num_patches).argsort(dim=1)  # ascending noise: the first n_keep are kept
        keep, hidden = order[:, : self.num_keep], order[:, self.num_keep:]
        out = enc(x, keep=keep)  # [B, 1 + n_keep, D]
        pred = self.forward_decoder(out.last_hidden_state, order)  # [B, N - n_keep, p·p·C]
        return {"loss": self.forward_loss(take(enc.patchify(x), hidden), pred),
                "embeddings": {self.cfg.modality: out.pooled.detach()}}

    def forward_decoder(self, latent: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + n_keep, D], order [B, N] (kept patches, then hidden ones) → predicted values
        [B, N - n_keep, p·p·C] of the hidden patches ``order[:, n_keep:]``."""
        h = self.embed(latent)  # [B, 1 + n_keep, W]
        b, n = order.shape
        filled = torch.cat([h[:, 1:], self.mask_token.expand(b, n - self.num_keep, -1)], dim=1)  # shuffled order
        restore = order.argsort(dim=1)  # rank of each grid patch in the shuffled order
        filled = torch.gather(filled, 1, restore.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # grid order
        h = torch.cat([h[:, :1], filled], dim=1) + self.pos
        rows = order[:, self.num_keep:] + 1  # the hidden patches' rows, after [CLS]
        for i, block in enumerate(self.blocks):
            h = block(h, rows if i == len(self.blocks) - 1 else None)
        return self.head(self.norm(h))

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """target, pred [B, M, P] at the hidden patches → mean squared error."""
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return (pred.float() - target.float()).pow(2).mean()



class DecoderBlock(nn.Module):
    """A pre-norm transformer block, batch-first, with one packed QKV projection and SDPA (written
    out rather than ``nn.TransformerEncoderLayer``, whose attention works sequence-first and copies
    q, k, v between layouts in training: ~8 % of the decoder's time). h [B, L, W] → [B, L, W], or
    [B, S, W] at ``rows`` [B, S] only (keys and values still cover the whole sequence)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 × [B, H, L, W/H]
        if rows is not None:
            q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, self.heads, -1, q.shape[-1]))
            h = take(h, rows)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, w))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))
