"""One encoder as a stock transformers directory: ``save_pretrained`` of the stock class with the
weights ``AutoModel`` expects (a ViT without its training-only mask token, with a pooler; BERT with
a pooler, see ``pooler.py``), its preprocessor, and ``selfsup.json`` so the pipeline reloads it.

Preprocessors: text ships its tokenizer, truncating at the trained length; image a stock ``CLIPImageProcessor`` (resize the short side
bilinearly, center crop, rescale, normalize), which is the pipeline's eval transform (center square,
bilinear resize, per-channel normalization) on square inputs and differs only in crop-then-resize
order on others; audio has no stock feature extractor computing torchaudio's ``MelSpectrogram``
(``ASTFeatureExtractor`` is Kaldi fbank), so the log-mel settings stay in ``selfsup.json`` and the
model card spells the computation out.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from pipeline.config import dump
from pipeline.encoders.saved import SETTINGS
from pipeline.export.pooler import pooler_weights


def stock_model(encoder):
    """(a stock transformers model with ``encoder``'s weights, its pooler scale)."""
    config = copy.deepcopy(encoder.model.config)
    if encoder.family == "vit":
        config.pooler_act, config.pooler_output_size = "linear", config.hidden_size
    state = {k: v for k, v in encoder.model.state_dict().items() if k != "embeddings.mask_token"}
    extra, scale = pooler_weights(encoder.family, config.hidden_size)
    model = type(encoder.model)(config)  # stock defaults: a pooler, no mask token
    model.load_state_dict(state | extra, strict=True)
    return model.eval(), scale


def image_processor(modality):
    from transformers import CLIPImageProcessor

    c = modality.cfg
    mean, std = c.mean or [0.5] * c.channels, c.std or [0.5] * c.channels
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": c.size}, resample=2, do_center_crop=True,
                              crop_size={"height": c.size, "width": c.size}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=c.channels == 3)


def export_encoder(encoder, modality, out: str | Path) -> Path:
    """Write ``out/`` (stock model + preprocessor + ``selfsup.json``); returns ``out``. A text
    tokenizer truncates at the trained length, not at its own default (512 from ``selfsup
    tokenize``), which would keep tokens the encoder never saw."""
    out = Path(out)
    model, scale = stock_model(encoder)
    model.save_pretrained(str(out))
    if modality.name == "text":
        modality.tokenizer.model_max_length = modality.cfg.max_length
    assets = modality.save_assets(out)
    if encoder.family == "vit" and modality.name == "image":
        image_processor(modality).save_pretrained(str(out))
    settings = dump(modality.cfg) | {k: "." for k in assets}
    (out / SETTINGS).write_text(json.dumps({
        "version": 1, "modality": modality.name, "family": encoder.family,
        "encoder": dump(encoder.cfg.model_copy(update={"init_from": None})), "modality_settings": settings,
        "pooler_scale": scale,
    }, indent=1) + "\n")
    return out


@torch.no_grad()
def hidden_parity(encoder, model, batch) -> float:
    """Max abs difference of every hidden state and the final states, stock vs training-time."""
    ours = encoder.eval()(batch)
    theirs = model(**encoder.model_inputs(batch), output_hidden_states=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True)]
    return max(diffs + [(ours.last_hidden_state - theirs.last_hidden_state).abs().max().item()])
