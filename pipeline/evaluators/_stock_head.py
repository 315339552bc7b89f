"""A trained ``classify`` objective saved as the stock transformers classifier of its encoder's family.

ViT encoders (images; audio log-mel as a one-channel image) become ``ViTForImageClassification``,
BERT encoders ``BertForSequenceClassification``; the weights are copied, not approximated, since the
objective's head reads what those classes read. A modality with an ``image_processor()`` saves it
beside the model; a one-channel image encoder is widened to three channels with ITU-R 601
luminance weights (the grey value PIL computes), because ``transformers.pipeline`` hands RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError

_LUMA = (0.299, 0.587, 0.114)


def save(obj, mod, id2label: dict[int, str], out_dir: Path) -> None:
    """Write ``obj`` (a ``classify.Objective``) with its encoder as a stock model into ``out_dir``."""
    from transformers import BertForSequenceClassification, ViTForImageClassification

    enc = obj.encoders[obj.cfg.modality]
    config = enc.model.config.__class__.from_dict(enc.model.config.to_dict())
    config.id2label = {int(i): n for i, n in id2label.items()}
    config.label2id = {n: int(i) for i, n in id2label.items()}
    config.num_labels = len(id2label)
    body = {k: v.detach().cpu().clone() for k, v in enc.model.state_dict().items()}
    head = {f"classifier.{k}": v.detach().cpu() for k, v in obj.classifier.state_dict().items()}
    processor = getattr(mod, "image_processor", None)
    if enc.family == "vit":
        body.pop("embeddings.mask_token", None)
        if processor is not None and config.num_channels == 1:
            key = "embeddings.patch_embeddings.projection.weight"  # [D, 1, p, p] → [D, 3, p, p]
            body[key] = torch.cat([body[key] * w for w in _LUMA], dim=1)
            config.num_channels = 3
        model = ViTForImageClassification(config)
        state = {**{f"vit.{k}": v for k, v in body.items()}, **head}
    elif enc.family == "bert":
        model = BertForSequenceClassification(config)
        pooler = obj.pooler[0].state_dict()
        state = {**{f"bert.{k}": v for k, v in body.items()}, **head,
                 **{f"bert.pooler.dense.{k}": v.detach().cpu() for k, v in pooler.items()}}
    else:
        raise ConfigError(f"finetune: no stock classifier for a {enc.family} encoder")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"stock classifier: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(out_dir))
    if processor is not None:
        processor().save_pretrained(str(out_dir))
    if enc.has_tokenizer:
        enc.tokenizer.save_pretrained(str(out_dir))
