"""A CLIP pair without a stock dual-encoder class (audio–text) in the stage layout:
``encoders/<modality>/`` stock towers (``transformers_models``) + ``heads/clip/`` (projections and
logit scale in safetensors, as the pretrain stage wrote them), and its parity with the pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.export.transformers_models import export_encoder, stock_model


def export(objective, mods: dict, heads_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    for m in objective.modalities:
        export_encoder(objective.encoders[m], mods[m], out / "encoders" / m)
    shutil.copytree(heads_dir, out / "heads" / "clip", dirs_exist_ok=True)
    return out


@torch.no_grad()
def parity(objective, batch: dict) -> dict[str, float]:
    """Max abs difference of the normalized features: stock tower's [CLS] pooler (or mean of its
    states) through the saved projection vs the pipeline's CLIP features."""
    out = {}
    for m in objective.modalities:
        enc = objective.encoders[m]
        model, scale = stock_model(enc)
        res = model(**enc.model_inputs(batch[m]))
        if enc.cfg.pooling == "cls":
            pooled = res.pooler_output / scale
        else:
            pooled = enc.eval()._pool(res.last_hidden_state, batch[m].get("attention_mask") if isinstance(batch[m], dict) else None)
        ours = objective.features(batch, m)
        out[m] = (F.normalize(objective.proj[m](pooled).float(), dim=-1) - ours).abs().max().item()
    return out
