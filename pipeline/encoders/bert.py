"""``BertEncoder``: a transformers ``BertModel`` over tokenized text, with the forwards the
objectives need (mask tokens by id, the last layer at selected rows)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.encoders.base import Encoder, EncoderConfig, EncoderOutput, attend, take
from pipeline.train.sharding import call_as


class BertEncoder(Encoder):
    """A BERT over ``{"input_ids", "attention_mask"}`` [B, L]; the positions are the L tokens
    (the tokenizer's [CLS]/<s> is one of them, so ``num_prefix_tokens == 0``)."""

    family = "bert"
    has_tokenizer = True
    model_kwargs: ClassVar[dict] = {"add_pooling_layer": False}
    architecture = Encoder.architecture + ("vocab_size", "max_position_embeddings", "type_vocab_size")

    def __init__(self, cfg: EncoderConfig, tokenizer, max_length: int, where: str = "encoder"):
        from transformers import BertConfig, BertModel

        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ConfigError(f"{where}: the text tokenizer has no mask or pad token; train one with `selfsup tokenize`")
        dims = cfg.resolved(where)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=dims["hidden_size"],
                            num_hidden_layers=dims["num_layers"], num_attention_heads=dims["num_heads"],
                            intermediate_size=dims["intermediate_size"], hidden_dropout_prob=cfg.dropout,
                            attention_probs_dropout_prob=cfg.dropout, pad_token_id=tokenizer.pad_token_id,
                            # 512 at least, so that a later stage may use longer texts with the same weights
                            max_position_embeddings=max(512, max_length), attn_implementation="sdpa")
        super().__init__(BertModel(config, **self.model_kwargs), cfg, where)
        self.mask_token_id: int = tokenizer.mask_token_id
        #: the tokenizer the vocabulary belongs to (MLM masking, export beside the weights)
        self.tokenizer = tokenizer
        self.register_buffer("special_ids", torch.tensor(sorted(tokenizer.all_special_ids)), persistent=False)

    def forward(self, inputs, *, keep=None, mask=None, rows=None) -> EncoderOutput:
        """inputs {"input_ids", "attention_mask"} [B, L]; mask [B, L] bool: those ids become [MASK];
        rows [B, S] token indices where the last layer is evaluated."""
        from transformers.masking_utils import create_bidirectional_mask

        if keep is not None:
            raise NotImplementedError("text encoders run on whole sequences: drop tokens (keep=) is for "
                                      "patch encoders; mask them instead (mask=)")
        ids, attention = inputs["input_ids"], inputs.get("attention_mask")
        if mask is not None:
            ids = ids.masked_fill(mask, self.mask_token_id)
        m = self.model
        h = m.embeddings(input_ids=ids)
        # the stock model's own attention mask for its attention implementation (None: no padding)
        bias = create_bidirectional_mask(config=m.config, inputs_embeds=h, attention_mask=attention)
        hidden, layers = [h], self.layers
        for i, layer in enumerate(layers):
            if rows is None or i < len(layers) - 1:
                h = layer(h, bias)
            else:  # a padding mask is the same for every query: its first query row serves all
                h = call_as(layer, bert_layer_at, h, rows, None if bias is None else bias[:, :, :1])
            hidden.append(h)
        return self._output(h, hidden, rows, attention)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def model_inputs(self, inputs) -> dict:
        return {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}

    def num_tokens(self, inputs) -> int:
        return inputs["input_ids"].shape[1]

    def maskable(self, inputs) -> torch.Tensor:
        """Real tokens that are not special ([CLS], [SEP], padding …)."""
        ids = inputs["input_ids"]
        real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
        return real & ~torch.isin(ids, self.special_ids)


def bert_layer_at(layer, h: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers ``BertLayer`` (post-norm) with its outputs at ``rows`` only: h [B, L, D] →
    [B, S, D]; ``mask`` is the stock attention mask for one query row, [B, 1, 1, L]."""
    sa = layer.attention.self
    q = take(h, rows)
    a = attend(sa.query(q), sa.key(h), sa.value(h), sa.num_attention_heads, sa.dropout.p if sa.training else 0.0,
               sa.scaling, mask)
    a = layer.attention.output(a, q)
    return layer.output(layer.intermediate(a), a)
