"""An image–text CLIP stage as a stock ``VisionTextDualEncoderModel``.

The stock class projects each tower's ``pooler_output``; the exported towers' poolers pass the
[CLS] state through (``pooler.py``), so the export equals the pipeline's CLIP features exactly
when both towers were trained with ``pooling: cls`` (the starter's image–text CLIP stage sets it).
A mean-pooled tower has no stock equivalent: ``build`` refuses it naming the setting, and the export
stage writes such a pair in the stage layout instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.export.transformers_models import stock_model


def build(objective, vision_modality: str = "image", text_modality: str = "text"):
    """A ``VisionTextDualEncoderModel`` holding the towers, projections and logit scale of a CLIP
    objective (``pipeline.objectives.clip.Objective``)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    towers, scales = {}, {}
    for m in (vision_modality, text_modality):
        enc = objective.encoders[m]
        if enc.cfg.pooling != "cls":
            raise ConfigError(f"{m} tower: pooling {enc.cfg.pooling!r}; a VisionTextDualEncoderModel projects the "
                              f"[CLS] pooler output, so train the CLIP stage with encoders.{m}.pooling: cls")
        towers[m], scales[m] = stock_model(enc)
    proj = {m: objective.proj[m].weight.detach().float() for m in towers}
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        towers[vision_modality].config, towers[text_modality].config, projection_dim=proj[vision_modality].shape[0],
        logit_scale_init_value=float(objective.logit_scale.detach().reshape(())))
    model = VisionTextDualEncoderModel(config, vision_model=towers[vision_modality], text_model=towers[text_modality])
    with torch.no_grad():
        model.visual_projection.weight.copy_(proj[vision_modality] / scales[vision_modality])
        model.text_projection.weight.copy_(proj[text_modality] / scales[text_modality])
        model.logit_scale.copy_(objective.logit_scale.detach().reshape(()))
    return model.eval()


def export(objective, out: str | Path, text_modality, image_modality) -> Path:
    """Write the dual encoder, its tokenizer and image processor to ``out``. The tokenizer truncates
    at the trained length: with its own default (512) a long text would keep tokens the pipeline's
    features never saw, and the stock features of it would differ from the pipeline's."""
    from pipeline.export.transformers_models import image_processor

    out = Path(out)
    model = build(objective)
    model.save_pretrained(str(out))
    text_modality.tokenizer.model_max_length = text_modality.cfg.max_length
    text_modality.tokenizer.save_pretrained(str(out))
    image_processor(image_modality).save_pretrained(str(out))
    return out


@torch.no_grad()
def parity(objective, model, batch: dict) -> dict[str, float]:
    """Max abs difference of the L2-normalized image and text features, stock vs pipeline."""
    import torch.nn.functional as F

    text = objective.encoders["text"].model_inputs(batch["text"])
    stock = {"image": model.get_image_features(pixel_values=batch["image"]).pooler_output,
             "text": model.get_text_features(**text).pooler_output}
    return {m: (F.normalize(stock[m].float(), dim=-1) - objective.features(batch, m)).abs().max().item()
            for m in stock}
