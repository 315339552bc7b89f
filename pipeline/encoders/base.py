"""Encoders: one per modality, shared by every objective so that stages chain (an image encoder
pretrained with MAE is the image tower of a later CLIP stage).

Each encoder wraps a stock transformers model built from a config (``ViTModel`` over patch grids
for image and audio, ``BertModel`` over tokens for text) and adds what the objectives need on top
of the stock forward:

- ``forward(inputs)``: all hidden states, the final ones and a pooled embedding;
- ``forward(inputs, keep=idx)``: the encoder runs on the kept patches only (MAE);
- ``forward(inputs, mask=m)``: masked positions are replaced by the learned mask token (data2vec,
  MLM); ``keep`` and ``mask`` may be combined (mask first, then keep);
- ``forward(inputs, rows=r)``: the last layer is evaluated at the given rows only. Its keys and
  values still cover every row, so the states at those rows are the full forward's, but queries,
  output projection and MLP run on the rows an objective reads (the masked ones for MLM and
  data2vec, [CLS] for a CLIP tower with ``pooling: cls``) instead of on all of them;
- ``embed(inputs)``: the pooled embedding alone (through ``rows`` when it is the [CLS] state);
- ``patchify(inputs)``: per-patch values, the MAE regression targets.

Positions (the ``N`` of ``keep``, ``mask``, ``maskable`` and ``patchify``) are the maskable units:
patches in row-major grid order for a ViT, tokens for text. A ViT also has a [CLS] token in front
of them (``num_prefix_tokens == 1``), which is never masked or dropped; ``EncoderOutput.tokens``
strips it. The wrapped ``.model`` is what ``save_pretrained`` writes: stock
``transformers.AutoModel.from_pretrained(dir)`` loads it and computes the same full forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from pipeline.config import Config, ConfigError

#: width, depth, heads per preset; the MLP is ``mlp_ratio`` × width and patches are 16 unless set
PRESETS = {
    "tiny": {"hidden_size": 192, "num_layers": 4, "num_heads": 3},
    "small": {"hidden_size": 384, "num_layers": 12, "num_heads": 6},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12},
}


class EncoderConfig(Config):
    size: Literal["tiny", "small", "base"] = "tiny"
    #: overrides of the preset (None = the preset's value)
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    #: side of a square patch, in pixels (image) or mel bins × frames (audio); unused by text
    patch_size: int = 16
    dropout: float = 0.0
    #: pooled embedding: mean of the final patch/token states, or the first token ([CLS])
    pooling: Literal["mean", "cls"] = "mean"
    #: directory written by an earlier encoder's ``save_pretrained``: start from its weights
    init_from: str | None = None

    def resolved(self, where: str = "encoder") -> dict:
        """Preset merged with overrides: ``hidden_size, num_layers, num_heads, intermediate_size``."""
        dims = {k: getattr(self, k) if getattr(self, k) is not None else v for k, v in PRESETS[self.size].items()}
        for key, value in dims.items():
            if value < 1:
                raise ConfigError(f"{where}.{key}: must be at least 1 (got {value})")
        if dims["hidden_size"] % dims["num_heads"]:
            raise ConfigError(f"{where}.hidden_size: {dims['hidden_size']} is not divisible by "
                              f"num_heads {dims['num_heads']}")
        return {**dims, "intermediate_size": round(dims["hidden_size"] * self.mlp_ratio)}


@dataclass
class EncoderOutput:
    #: [B, L, D] final states, after the model's last normalization (L = prefix + positions);
    #: [B, S, D] at the requested rows when the forward was given ``rows`` [B, S]
    last_hidden_state: torch.Tensor
    #: num_layers + 1 tensors [B, L, D]: the embedding output (input of layer 1), then the output of
    #: each layer, as transformers' ``output_hidden_states`` returns them (the last one [B, S, D]
    #: with ``rows``). A ViT (pre-norm) applies its final LayerNorm after the last entry; BERT
    #: (post-norm) has none, so its last entry equals ``last_hidden_state``.
    hidden_states: tuple[torch.Tensor, ...]
    #: [B, D] pooled embedding (``EncoderConfig.pooling``); with ``rows``, the same pooling of the
    #: last layer's input, the deepest states computed at every row (what a health monitor watches)
    pooled: torch.Tensor
    #: [B, L] 1 for real tokens, 0 for padding; None when nothing is padded (ViT)
    attention_mask: torch.Tensor | None = None
    #: tokens in front of the maskable positions ([CLS] of a ViT), never masked or dropped
    num_prefix_tokens: int = 0

    @property
    def tokens(self) -> torch.Tensor:
        """[B, N, D] final states of the positions only, aligned with ``mask`` / ``keep``."""
        return self.last_hidden_state[:, self.num_prefix_tokens:]


class Encoder(nn.Module):
    """Base: ``.model`` is the stock transformers model; subclasses implement ``forward``."""

    #: extra ``__init__`` arguments of the stock class (``from_pretrained`` needs them too)
    model_kwargs: ClassVar[dict] = {}
    #: config fields that fix the weights' shapes; ``init_from`` must match them
    architecture: ClassVar[tuple[str, ...]] = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    #: the stock family (``selfsup.json`` records it)
    family: ClassVar[str]
    num_prefix_tokens = 0
    #: capabilities objectives ask for instead of probing attributes: per-position input values to
    #: reconstruct (``patchify``: MAE), a tokenizer whose ids it reads (``tokenizer``: MLM)
    has_patches: ClassVar[bool] = False
    has_tokenizer: ClassVar[bool] = False
    #: fraction of positions a masked-prediction objective hides by default (data2vec): BERT's 15 %
    #: for tokens, data2vec's 60 % for patches
    default_mask_ratio: ClassVar[float] = 0.15

    def __init__(self, model, cfg: EncoderConfig, where: str = "encoder"):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.hidden_size: int = model.config.hidden_size
        self.num_layers: int = model.config.num_hidden_layers
        if cfg.init_from:
            self.load(cfg.init_from, where)

    def forward(self, inputs, *, keep: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> EncoderOutput:
        raise NotImplementedError

    def embed(self, inputs) -> torch.Tensor:
        """[B, D]: the pooled embedding, computing no more of the last layer than it needs: with
        ``pooling: cls`` that layer runs at the [CLS] row alone."""
        if self.cfg.pooling == "cls":
            x = inputs["input_ids"] if isinstance(inputs, dict) else inputs
            return self(inputs, rows=torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)).last_hidden_state[:, 0]
        return self(inputs).pooled

    def _output(self, last: torch.Tensor, hidden: list[torch.Tensor], rows, attention=None) -> EncoderOutput:
        if rows is not None:  # rows are whatever the caller asked for: no prefix, no padding mask
            return EncoderOutput(last, tuple(hidden), self._pool(hidden[-2], attention), None, 0)
        return EncoderOutput(last, tuple(hidden), self._pool(last, attention), attention, self.num_prefix_tokens)

    @property
    def layers(self) -> nn.ModuleList:
        """The stock transformer layers, in order (the units FSDP shards)."""
        raise NotImplementedError

    @property
    def mask_token(self) -> nn.Parameter | None:
        """The learned vector ``mask=`` puts in place of a position, if it is a parameter of its own
        (a ViT's; BERT's [MASK] is a row of the vocabulary). Objectives that never mask leave it
        without gradient, so a stage freezes it unless one of its objectives uses it."""
        return None

    def model_inputs(self, inputs) -> dict:
        """Keyword arguments of the stock ``.model`` for a batch (export parity checks)."""
        raise NotImplementedError

    def num_tokens(self, inputs) -> int:
        """N: how many maskable positions a batch has (``keep`` indexes and ``mask`` covers them)."""
        raise NotImplementedError

    def maskable(self, inputs) -> torch.Tensor:
        """[B, N] bool: positions an objective may mask or drop."""
        raise NotImplementedError

    def patchify(self, inputs) -> torch.Tensor:
        """[B, N, patch_dim] input values per position (MAE targets)."""
        raise NotImplementedError(f"{type(self).__name__} has no patches to reconstruct; "
                                  "MAE applies to patch encoders (image, audio)")

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        self.model.save_pretrained(str(path), **kwargs)

    def load(self, path: str | Path, where: str = "encoder") -> None:
        """Copy the weights of an earlier ``save_pretrained`` into this encoder; the architecture
        (widths, depth, patch grid, vocabulary) must be the same, dropout and such may differ."""
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{where}.init_from: {path}: no config.json (not a save_pretrained directory)")
        saved, ours = json.loads(config_file.read_text()), json.loads(self.model.config.to_json_string(use_diff=False))
        for key in ("model_type", *self.architecture):
            if _square(saved.get(key)) != _square(ours.get(key)):
                raise ConfigError(f"{where}.init_from: {path} holds a {saved.get('model_type')} with {key} "
                                  f"{saved.get(key)}, this encoder has {ours.get(key)}; use the earlier stage's settings")
        loaded = type(self.model).from_pretrained(str(path), **self.model_kwargs)
        self.model.load_state_dict(loaded.state_dict())

    def _pool(self, states: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] → [B, D]: first token, or mean over the positions (weighted by ``weights`` [B, L])."""
        if self.cfg.pooling == "cls":
            return states[:, 0]
        if weights is None:
            return states[:, self.num_prefix_tokens:].mean(1)
        w = weights.to(states.dtype).unsqueeze(-1)
        return (states * w).sum(1) / w.sum(1).clamp(min=1.0)



# ---------------------------------------------------------------- one layer at selected rows
#
# The stock layers' own computation, written out so that queries and everything after attention
# run on ``rows`` only while keys and values cover the whole sequence. They read the stock
# submodules (``tests/test_encoders.py`` pins them to the stock layer's output) and run through
# ``sharding.call_as``, so that a layer sharded by FSDP gathers its weights for them as for its forward.



def take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], rows [B, S] → [B, S, D]."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dropout: float, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head SDPA: q [B, S, D], k and v [B, L, D] → [B, S, D]."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                                           dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)



def rows_of(mask: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, N] bool → (rows [B, S], valid [B, S]) for ``forward(rows=)``: each sample's True positions
    in ascending order plus ``offset`` (the prefix tokens), padded to the largest count (at least
    1) with row ``offset``; ``valid`` marks the real ones, so ``last_hidden_state[valid]`` lists the
    states in the order of ``mask.nonzero()``."""
    counts = mask.sum(1)
    size = max(1, int(counts.max())) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :size]  # True positions first
    valid = torch.arange(size, device=mask.device) < counts.unsqueeze(1)
    return torch.where(valid, order, 0) + offset, valid


def _square(value):
    """A ViT size as [rows, columns] (transformers accepts 16 and [16, 16] alike)."""
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
