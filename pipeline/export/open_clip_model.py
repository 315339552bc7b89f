"""An image–text CLIP stage as an open_clip model: ``open_clip_config.json`` in the layout open_clip
reads from a model directory (``local-dir:``, ``hf-hub:``): ``model_cfg`` (open_clip's own
``VisionTransformer`` for the image tower, its Hugging Face text tower pointing at the exported
text directory) and ``preprocess_cfg`` (the pipeline's eval preprocessing), plus converted weights
in safetensors.

The config names the text directory relative to itself, so the export may be moved or copied.
open_clip hands ``hf_model_name`` to transformers as it is, where a relative path resolves against
the working directory: plain open_clip loads the export from inside it (``local-dir:.``), and
``load`` loads it from anywhere by resolving the path first (``register``).

open_clip reads ``preprocess_cfg`` only for a ``local-dir:`` or ``hf-hub:`` name. A name registered
by ``add_model_config`` gets open_clip's defaults (OpenAI's mean and std, bicubic) whatever its file
says (every model config key goes to the model's constructor, which refuses any other), so ``load``
passes the settings to ``create_model_and_transforms`` itself.

The eval preprocessing: open_clip's ``resize_mode: shortest`` resizes the short side to ``size``
(bilinear, PIL's resampling as the pipeline's) and then crops the center, where the pipeline crops
the center square and then resizes it. On square images, and on others whose center crop falls on
whole pixels of the resized image, the two are equal; otherwise open_clip's crop sits on a rounded
pixel offset of a resized image whose long side is truncated to whole pixels, a shift of the
sampling grid by under one resized pixel (``tests/test_export.py`` measures both).

open_clip's ViT maps exactly onto transformers' ViT: pre-norm blocks with exact GELU (``norm_kwargs``
carries our LayerNorm eps), no ``ln_pre``, ``ln_post`` then the class token (``pool_type: tok``)
times ``proj``. Its patch convolution has no bias; ours is folded into the patch positions'
positional embedding (a constant added to every patch either way). The HF tower's
``cls_last_hidden_state_pooler`` + a bias-free ``linear`` projection is our [CLS] pooling.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

#: the files ``export`` writes, under the names open_clip gives them in a model directory
CONFIG, WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
#: the ``text_cfg`` entries naming the text directory, relative to the config's directory
TEXT_PATHS = ("hf_model_name", "hf_tokenizer_name")


def preprocess_config(image_modality) -> dict:
    """open_clip's ``preprocess_cfg`` of the pipeline's eval preprocessing of ``image_modality``."""
    c = image_modality.cfg
    return {"size": c.size, "mode": "RGB", "mean": c.mean or [0.5] * c.channels, "std": c.std or [0.5] * c.channels,
            "interpolation": "bilinear", "resize_mode": "shortest"}


def model_config(objective, text_dir: Path, out: Path) -> dict:
    """The open_clip model config written to ``out``, naming ``text_dir`` relative to ``out``.
    ``context_length`` is the length the text tower trained on (its ``selfsup.json``): open_clip's
    tokenizer truncates there, as the pipeline does, where the tokenizer's own limit (512) would
    keep tokens the pipeline's features never saw."""
    from pipeline.encoders.saved import SETTINGS

    vit = objective.encoders["image"].model.config
    trained = json.loads((Path(text_dir) / SETTINGS).read_text())["modality_settings"]["max_length"]
    text = Path(os.path.relpath(Path(text_dir).resolve(), Path(out).resolve())).as_posix()
    return {"embed_dim": objective.proj["image"].weight.shape[0],
            "vision_cfg": {"image_size": vit.image_size[0] if isinstance(vit.image_size, list) else vit.image_size,
                           "patch_size": vit.patch_size, "layers": vit.num_hidden_layers, "width": vit.hidden_size,
                           "head_width": vit.hidden_size // vit.num_attention_heads,
                           "mlp_ratio": vit.intermediate_size / vit.hidden_size, "no_ln_pre": True, "pool_type": "tok",
                           "norm_kwargs": {"eps": vit.layer_norm_eps}},
            "text_cfg": {**dict.fromkeys(TEXT_PATHS, text), "hf_proj_type": "linear",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": trained},
            "custom_text": True}


def state_dict(objective) -> dict[str, torch.Tensor]:
    """open_clip ``CustomTextCLIP`` weights from our towers and projections."""
    v = {k: t.detach().float() for k, t in objective.encoders["image"].model.state_dict().items()}
    out = {"visual.conv1.weight": v["embeddings.patch_embeddings.projection.weight"],
           "visual.class_embedding": v["embeddings.cls_token"].reshape(-1)}
    pos = v["embeddings.position_embeddings"][0].clone()
    pos[1:] += v["embeddings.patch_embeddings.projection.bias"]
    out["visual.positional_embedding"] = pos
    n = objective.encoders["image"].model.config.num_hidden_layers
    for i in range(n):
        src, dst = f"layers.{i}.", f"visual.transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = torch.cat([v[f"{src}attention.{q}_proj.weight"] for q in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([v[f"{src}attention.{q}_proj.bias"] for q in "qkv"])
        for a, b in (("attention.o_proj", "attn.out_proj"), ("layernorm_before", "ln_1"),
                     ("layernorm_after", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = v[f"{src}{a}.{p}"]
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = v["layernorm.weight"], v["layernorm.bias"]
    out["visual.proj"] = objective.proj["image"].weight.detach().float().T.contiguous()
    for k, t in objective.encoders["text"].model.state_dict().items():
        out[f"text.transformer.{k}"] = t.detach().float()
    out["text.proj.weight"] = objective.proj["text"].weight.detach().float()
    out["logit_scale"] = objective.logit_scale.detach().float().reshape(())
    return out


def export(objective, out: Path, text_dir: Path, image_modality) -> tuple[Path, Path]:
    """``out/open_clip_config.json`` and ``out/open_clip_model.safetensors``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg_file, weights = out / CONFIG, out / WEIGHTS
    cfg = {"model_cfg": model_config(objective, text_dir, out), "preprocess_cfg": preprocess_config(image_modality)}
    cfg_file.write_text(json.dumps(cfg, indent=1) + "\n")
    save_file({k: t.contiguous() for k, t in state_dict(objective).items()}, str(weights))
    return cfg_file, weights


def register(export_dir: str | Path, name: str = "open_clip_config") -> str:
    """Make the open_clip model of ``export_dir`` known to open_clip as ``name`` (for
    ``create_model`` and ``get_tokenizer``), its text directory resolved against ``export_dir``
    wherever that now lies; returns ``name``. open_clip reads model configs from files only, so the
    resolved config passes through a temporary ``<name>.json``; it is read at once and stays
    registered after the file is gone. The name carries no preprocessing: ``load`` adds it."""
    import open_clip

    cfg_file = Path(export_dir) / CONFIG
    cfg = json.loads(cfg_file.read_text())
    cfg = cfg.get("model_cfg", cfg)  # a flat model config (an earlier export) as it is
    for key in TEXT_PATHS:
        cfg["text_cfg"][key] = str((cfg_file.parent / cfg["text_cfg"][key]).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / f"{name}.json"
        file.write_text(json.dumps(cfg))
        open_clip.add_model_config(file)
    return name


def load(export_dir: str | Path):
    """(open_clip model in eval mode, its eval preprocess) of ``export_dir`` from anywhere, through
    ``register`` and the config's ``preprocess_cfg``: what ``create_model_and_transforms("local-dir:.")``
    gives inside ``export_dir``."""
    import open_clip

    pre = json.loads((Path(export_dir) / CONFIG).read_text()).get("preprocess_cfg", {})
    model, _, preprocess = open_clip.create_model_and_transforms(
        register(export_dir), pretrained=str(Path(export_dir) / WEIGHTS), image_mean=pre.get("mean"),
        image_std=pre.get("std"), image_interpolation=pre.get("interpolation"),
        image_resize_mode=pre.get("resize_mode"))
    return model.eval(), preprocess


@torch.no_grad()
def parity(objective, model, batch: dict) -> dict[str, float]:
    enc = objective.encoders["text"]
    text = enc.model_inputs(batch["text"])["input_ids"]
    import torch.nn.functional as F

    stock = {"image": model.encode_image(batch["image"], normalize=True),
             "text": model.encode_text(text, normalize=True)}
    return {m: (F.normalize(stock[m].float(), dim=-1) - objective.features(batch, m)).abs().max().item() for m in stock}
