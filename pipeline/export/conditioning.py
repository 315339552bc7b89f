"""Diffusion conditioning: encoders laid out as diffusers pipeline components.

``text_encoder/`` (a stock transformers model diffusers loads from ``model_index.json`` as
``["transformers", "BertModel"]``) and ``tokenizer/`` with ``model_max_length`` set to the length the
encoder was trained on (BERT's 512 default would pad every prompt to 512 tokens); Stable Diffusion
pipelines call ``text_encoder(ids)[0]``, the last hidden state, as the UNet's
``encoder_hidden_states``, so the UNet's ``cross_attention_dim`` is the hidden size. Image and audio
encoders go beside it (``image_encoder/``, ``audio_encoder/``): their token states condition a UNet
the same way. ``conditioning.json`` says which layer, how long, how wide, and how to get a pooled
embedding (the [CLS] state, ``pooler_output / pooler_scale``; with a CLIP stage, its projection).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.export.transformers_models import export_encoder

COMPONENT = {"text": "text_encoder", "image": "image_encoder", "audio": "audio_encoder"}


def export(encoders: dict, out: str | Path, projections: dict | None = None) -> dict:
    """``encoders``: {modality: (modality, encoder)}; ``projections``: {modality: (clip dir, weight
    name)} of CLIP heads. Writes the components and ``conditioning.json``; returns its content."""
    out = Path(out)
    info = {"version": 1, "components": {}}
    for name, (mod, enc) in encoders.items():
        part = COMPONENT[name]
        path = export_encoder(enc, mod, out / part)
        scale = json.loads((path / "selfsup.json").read_text())["pooler_scale"]
        entry = {"path": part, "class": type(enc.model).__name__, "hidden_layer": "last_hidden_state",
                 "hidden_size": enc.hidden_size, "cross_attention_dim": enc.hidden_size,
                 "pooled": {"what": "pooler_output / pooler_scale = the [CLS] state" if enc.cfg.pooling == "cls"
                            else "mean of last_hidden_state over real tokens (attention_mask)",
                            "pooler_scale": scale, "pooling": enc.cfg.pooling},
                 "pooled_projection": (projections or {}).get(name)}
        if name == "text":  # export_encoder set its model_max_length to the trained length
            mod.tokenizer.save_pretrained(str(out / "tokenizer"))
            entry |= {"tokenizer": "tokenizer", "max_length": mod.cfg.max_length}
        else:
            entry["sequence_length"] = enc.num_patches + enc.num_prefix_tokens
        info["components"][part] = entry
    (out / "conditioning.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
