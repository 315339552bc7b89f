"""``ViTEncoder``: a transformers ``ViTModel`` over a [B, C, H, W] grid of values (image pixels, or
an audio log-mel spectrogram as a one-channel image), with the forwards the objectives need."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.encoders.base import Encoder, EncoderConfig, EncoderOutput, attend, take
from pipeline.train.sharding import call_as


class ViTEncoder(Encoder):
    """A ViT over a [B, C, H, W] grid of values: image pixels, or audio log-mel as a 1-channel
    image. The sequence is [CLS] + H/p × W/p patches in row-major order."""

    model_kwargs: ClassVar[dict] = {"add_pooling_layer": False, "use_mask_token": True}
    architecture = Encoder.architecture + ("image_size", "patch_size", "num_channels")
    family = "vit"
    has_patches = True
    num_prefix_tokens = 1
    default_mask_ratio = 0.6

    def __init__(self, cfg: EncoderConfig, image_size: tuple[int, int], channels: int, where: str = "encoder"):
        from transformers import ViTConfig, ViTModel

        p = cfg.patch_size
        if p < 1 or image_size[0] % p or image_size[1] % p:
            raise ConfigError(f"{where}.patch_size: {p} does not tile the {image_size[0]}×{image_size[1]} input; "
                              f"pick a divisor of both sides")
        dims = cfg.resolved(where)
        config = ViTConfig(hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_layers"],
                           num_attention_heads=dims["num_heads"], intermediate_size=dims["intermediate_size"],
                           hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                           layer_norm_eps=1e-6, image_size=list(image_size), patch_size=p, num_channels=channels,
                           attn_implementation="sdpa")
        super().__init__(ViTModel(config, **self.model_kwargs), cfg, where)
        self.image_size = tuple(image_size)
        self.patch_size = p
        self.channels = channels
        self.grid = (image_size[0] // p, image_size[1] // p)  # rows, columns of patches
        self.num_patches = self.grid[0] * self.grid[1]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input [B, C, H, W] from a collated batch (audio overrides this to crop)."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"encoder built for {self.image_size[0]}×{self.image_size[1]} inputs, "
                             f"got {x.shape[-2]}×{x.shape[-1]}")
        return x

    def forward(self, inputs, *, keep=None, mask=None, rows=None) -> EncoderOutput:
        """inputs [B, C, H, W]; keep [B, n_keep] patch indices; mask [B, N] bool; rows [B, S] indices
        into the sequence ([CLS] is row 0, patch n row 1 + n; after ``keep``, its order). Output
        length L = 1 + N, 1 + n_keep with ``keep``, S with ``rows``."""
        m = self.model
        emb = m.embeddings
        x = self.prepare(inputs).to(emb.patch_embeddings.projection.weight.dtype)
        x = emb.patch_embeddings(x)  # [B, N, D]
        if mask is not None:  # as ViTEmbeddings does with bool_masked_pos: swap the patch, keep its position
            x = torch.where(mask.unsqueeze(-1), emb.mask_token.to(x.dtype), x)
        pos = emb.position_embeddings  # [1, 1 + N, D], [CLS] first
        x = x + pos[:, 1:]
        if keep is not None:  # position added first, so every kept patch remembers where it was
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, n_keep, D]
        cls = (emb.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        h = emb.dropout(torch.cat([cls, x], dim=1))
        hidden = [h]
        for i, layer in enumerate(self.layers):  # the stock layers; no attention mask: every sequence is full
            h = layer(h, None) if rows is None or i < len(self.layers) - 1 else call_as(layer, vit_layer_at, h, rows)
            hidden.append(h)
        return self._output(m.layernorm(h), hidden, rows)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def mask_token(self) -> nn.Parameter:
        return self.model.embeddings.mask_token

    def model_inputs(self, inputs) -> dict:
        return {"pixel_values": self.prepare(inputs)}

    def num_tokens(self, inputs) -> int:
        return self.num_patches

    def maskable(self, inputs) -> torch.Tensor:
        return torch.ones(inputs.shape[0], self.num_patches, dtype=torch.bool, device=inputs.device)

    def patchify(self, inputs) -> torch.Tensor:
        """[B, C, H, W] → [B, N, p·p·C]: patch n is grid cell (n // columns, n % columns), the
        token order of the model; values within a patch ordered (row, column, channel)."""
        x = self.prepare(inputs)
        b, c = x.shape[:2]
        (rows, cols), p = self.grid, self.patch_size
        x = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)  # [B, rows, cols, p, p, C]
        return x.reshape(b, rows * cols, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``: [B, N, p·p·C] → [B, C, H, W] (e.g. to show reconstructions)."""
        (rows, cols), p, c = self.grid, self.patch_size, self.channels
        x = patches.reshape(-1, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, rows, p, cols, p]
        return x.reshape(-1, c, rows * p, cols * p)


def vit_layer_at(layer, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """transformers ``ViTLayer`` (pre-norm) with its outputs at ``rows`` only: h [B, L, D] → [B, S, D]."""
    att = layer.attention
    x = layer.layernorm_before(h)
    a = attend(att.q_proj(take(x, rows)), att.k_proj(x), att.v_proj(x), att.num_attention_heads,
               att.attention_dropout if att.training else 0.0, att.scaling)
    h = layer.dropout(att.o_proj(a)) + take(h, rows)
    return layer.dropout(layer.mlp(layer.layernorm_after(h))) + h
