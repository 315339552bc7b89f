"""Export a run's encoders for transformers, diffusers and CLIP users.

    selfsup export runs/starter/clip_image_text runs/starter/clip_audio_text --out runs/starter/export \\
        --data '[{shards: data/starter/emoji/test, modalities: [image, text]},
                {shards: data/starter/speech/test, modalities: [audio, text]}]'

Writes ``DIR/<modality>/`` (stock transformers model + preprocessor + ``selfsup.json``) for each
final encoder, ``DIR/<stage>/`` for each CLIP stage (image–text: a stock
``VisionTextDualEncoderModel``; other pairs: stock towers + heads in the stage layout),
``DIR/conditioning/`` (diffusers components + ``conditioning.json``), a model card in each, and
``DIR/parity.json``: max abs difference between each stock model and the training-time module on
real samples (the first batch of ``data`` holding the model's modalities).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from pipeline.config import ConfigError
from pipeline.data.loader import SourceConfig
from pipeline.stage import Context, StageConfig

positional = ("stages",)
#: parity must hold to this (fp32)
TOLERANCE = 1e-5


class Config(StageConfig):
    #: stage directories (or stage names of the run) whose encoders and CLIP heads are exported
    stages: list[str] = Field(default_factory=list)
    #: modality → stage its final encoder comes from (default: the last listed stage holding one)
    encoders: dict[str, str] = Field(default_factory=dict)
    #: shard sets of real samples for the parity checks (test splits)
    data: list[SourceConfig] = Field(default_factory=list)
    #: samples per parity check
    samples: int = Field(8, ge=1)


def _stage_dir(value: str, ctx: Context) -> Path:
    if ctx.run_dir is not None and "/" not in value and (ctx.run_dir / value).is_dir():
        return ctx.run_dir / value
    path = ctx.path(value)
    if not (path / "encoders").is_dir():
        raise ConfigError(f"export: {value}: not a stage directory (no encoders/ in {path})")
    return path


def _dirs(cfg: Config, ctx: Context) -> list[Path]:
    dirs = [_stage_dir(s, ctx) for s in [*cfg.stages, *cfg.encoders.values()]]
    if not dirs:
        raise ConfigError("export: name at least one stage directory (positional) or `encoders: {image: STAGE}`")
    return list(dict.fromkeys(dirs))


def inputs(cfg: Config, ctx: Context) -> list[str]:
    return [str(p) for d in _dirs(cfg, ctx) for p in sorted(d.glob("*/*/*.safetensors"))]


def _batch(cfg: Config, ctx: Context, mods: dict) -> dict:
    from pipeline.export.samples import batch

    for src in cfg.data:
        if set(mods) <= set(src.modalities):
            return batch(src.shards, {m: mods[m].cfg for m in mods}, cfg.samples, ctx.base_dir)
    raise ConfigError(f"export.data: no shard set holds {', '.join(sorted(mods))} for the parity check; "
                      f"add one, e.g. {{shards: SHARDS, modalities: [{', '.join(sorted(mods))}]}}")


def _check(name: str, diffs: dict) -> dict:
    worst = max(diffs.values())
    if worst > TOLERANCE:
        raise RuntimeError(f"export {name}: the stock model differs from the training-time module by {worst:.2e} "
                           f"(> {TOLERANCE:g}): {diffs}")
    return diffs


def run(cfg: Config, ctx: Context) -> dict:
    from pipeline.encoders import saved
    from pipeline.export import card, conditioning, dual_encoder, stage_clip
    from pipeline.export.transformers_models import export_encoder, hidden_parity, stock_model

    out, dirs = ctx.out_dir, _dirs(cfg, ctx)
    recipe = (ctx.run_dir / "recipe.yaml").read_text() if ctx.run_dir and (ctx.run_dir / "recipe.yaml").is_file() else None
    base = ctx.base_dir
    final = {m: _stage_dir(s, ctx) for m, s in cfg.encoders.items()}
    for d in dirs:
        for enc_dir in sorted((d / "encoders").iterdir()):
            if enc_dir.name not in cfg.encoders:
                final[enc_dir.name] = d  # the last listed stage wins
    parity, loaded = {}, {}
    for m, d in sorted(final.items()):
        mod, enc = saved.load(d / "encoders" / m)
        loaded[m] = (mod, enc.eval())
        export_encoder(enc, mod, out / m)
        model, _ = stock_model(enc)
        parity[m] = _check(m, {"hidden_states": hidden_parity(enc, model, _batch(cfg, ctx, {m: mod})[m])})
        card.write(out / m, f"{m} encoder from {d.name}", _usage(m, enc), recipe, base, ctx.run_dir, parity[m],
                   encoder=d.name)
    projections = {}
    for d in dirs:
        for heads in sorted((d / "heads").glob("*")) if (d / "heads").is_dir() else []:
            info = saved.heads_settings(heads)
            if info["objective"] != "clip":
                continue
            pair = {m: saved.load(d / "encoders" / m) for m in info["modalities"]}
            objective = saved.load_heads(heads, {m: e.eval() for m, (_, e) in pair.items()})
            batch = _batch(cfg, ctx, {m: mod for m, (mod, _) in pair.items()})
            target = out / d.name
            stock = set(info["modalities"]) == {"image", "text"} and all(e.cfg.pooling == "cls" for _, e in pair.values())
            if set(info["modalities"]) == {"image", "text"} and not stock:
                ctx.log.warning("%s: mean-pooled towers have no stock VisionTextDualEncoderModel equivalent (it projects "
                                "the [CLS] pooler); exported in the stage layout. Train with pooling: cls for one", d.name)
            if stock:
                dual_encoder.export(objective, target, pair["text"][0], pair["image"][0])
                from transformers import AutoModel

                diffs = dual_encoder.parity(objective, AutoModel.from_pretrained(str(target)).eval(), batch)
                diffs |= _open_clip(objective, pair["text"][0], pair["image"][0], target, batch)
                usage = DUAL_USAGE
            else:
                stage_clip.export(objective, {m: mod for m, (mod, _) in pair.items()}, heads, target)
                diffs = stage_clip.parity(objective, batch)
                usage = STAGE_CLIP_USAGE
            parity[d.name] = _check(d.name, diffs)
            card.write(target, f"CLIP {' / '.join(info['modalities'])} from {d.name}", usage, recipe, base,
                       ctx.run_dir, diffs, encoder=d.name)
            for m in info["modalities"]:
                if final.get(m) == d:  # the projection trained on the exported encoder
                    weight = ({"image": "visual_projection.weight", "text": "text_projection.weight"}[m]
                              + " (of pooler_output)" if usage is DUAL_USAGE else f"heads/clip: proj.{m}.weight")
                    projections[m] = {"clip": d.name, "weight": weight}
    cond = conditioning.export(loaded, out / "conditioning", projections)
    (out / "conditioning" / "README.md").write_text(CONDITIONING_USAGE)
    (out / "parity.json").write_text(json.dumps({"tolerance": TOLERANCE, "max_abs_diff": parity}, indent=1) + "\n")
    ctx.log.info("exported %s to %s; parity %s", ", ".join(parity), out,
                 {k: f"{max(v.values()):.1e}" for k, v in parity.items()})
    return {"exported": sorted(parity), "conditioning": sorted(cond["components"])}


def _open_clip(objective, text_modality, image_modality, target: Path, batch: dict) -> dict[str, float]:
    """The pair also as an open_clip model; its text tower's config and tokenizer in ``open_clip_text/``."""
    from pipeline.export import open_clip_model
    from pipeline.export.transformers_models import export_encoder

    text_dir = export_encoder(objective.encoders["text"], text_modality, target / "open_clip_text")
    open_clip_model.export(objective, target, text_dir, image_modality)
    model, _ = open_clip_model.load(target)
    return {f"open_clip_{m}": v for m, v in open_clip_model.parity(objective, model, batch).items()}


def _usage(m: str, enc) -> str:
    pre = {"text": "AutoTokenizer", "image": "AutoImageProcessor"}.get(m)
    lines = ["```python", "from transformers import AutoModel", "model = AutoModel.from_pretrained(DIR)"]
    if pre:
        lines += [f"from transformers import {pre}", f"pre = {pre}.from_pretrained(DIR)"]
    lines.append("```")
    note = (f"Pooled embedding used in training: `{enc.cfg.pooling}` "
            + ("(`last_hidden_state[:, 0]`, or `pooler_output / pooler_scale` from selfsup.json)."
               if enc.cfg.pooling == "cls" else "(mean of `last_hidden_state` over the positions, [CLS] excluded "
                                                "for a ViT, padding excluded for text)."))
    if m == "text":
        note += " The tokenizer's `model_max_length` is the trained text length, where `truncation=True` cuts."
    if m == "audio":
        note += (" Input: torchaudio `MelSpectrogram(sample_rate, n_fft, hop_length, n_mels)` of a mono clip, "
                 "`(log(mel + 1e-6) - mean) / std`, as `[B, 1, n_mels, frames]` cut to whole patches; the "
                 "settings are `modality_settings` in selfsup.json (no stock feature extractor computes this).")
    return "\n".join(lines) + "\n\n" + note


DUAL_USAGE = """A stock `VisionTextDualEncoderModel` (ViT + BERT towers, projections, logit scale):

```python
from transformers import AutoModel, AutoTokenizer, AutoImageProcessor
model = AutoModel.from_pretrained(DIR)
image_features = model.get_image_features(**AutoImageProcessor.from_pretrained(DIR)(images, return_tensors="pt")).pooler_output
text_features = model.get_text_features(**AutoTokenizer.from_pretrained(DIR)(texts, padding=True, truncation=True, return_tensors="pt")).pooler_output
```
Both towers pool the [CLS] state (trained with `pooling: cls`); their stock poolers pass it through.
The tokenizer's `model_max_length` is the trained text length, where `truncation=True` cuts.

The same model for open_clip (its own ViT tower; the Hugging Face text tower reads its config and
tokenizer from `open_clip_text/`, which `open_clip_config.json` names relative to DIR, so DIR may be
moved or copied; the config's `preprocess_cfg` is the training's eval preprocessing). open_clip
resolves that path against the working directory, so from inside DIR:

```python
import open_clip
import torch
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
model.eval()  # open_clip returns it in training mode
tokenizer = open_clip.get_tokenizer("local-dir:.")
pixels = torch.stack([preprocess(image) for image in pil_images])
features = model.encode_image(pixels, normalize=True), model.encode_text(tokenizer(texts), normalize=True)
```
From anywhere else, with the pipeline installed, `model, preprocess =
pipeline.export.open_clip_model.load(DIR)` gives the same model and preprocess with the path
resolved, and `open_clip.get_tokenizer(f"local-dir:{DIR}")` the tokenizer. (A name registered with
`open_clip.add_model_config` gets open_clip's default preprocessing, OpenAI's mean and std, whatever
the config says.) `preprocess` resizes the short side and then crops the center, where training
cropped the center square and then resized it: the same pixels on square images; on others the
crop can sit under a pixel apart, so pass square images for the trained features.
"""

STAGE_CLIP_USAGE = """A CLIP pair in the stage layout: `encoders/<modality>/` (stock transformers towers) and
`heads/clip/` (`heads.safetensors`: `proj.<modality>.weight`, `logit_scale`). Features are the
tower's pooled embedding (selfsup.json `encoder.pooling`) times the projection, L2-normalized.
"""

CONDITIONING_USAGE = """# Diffusion conditioning

`text_encoder/` and `tokenizer/` are diffusers pipeline components: name them in a pipeline's
`model_index.json` (`"text_encoder": ["transformers", "BertModel"]`, `"tokenizer": ["transformers",
<tokenizer_class of tokenizer/tokenizer_config.json>]`) and build the UNet with
`cross_attention_dim` = `conditioning.json` `cross_attention_dim`. The pipeline then passes
`text_encoder(ids)[0]` as `encoder_hidden_states`; custom code may pass `prompt_embeds` computed the
same way. `image_encoder/` and `audio_encoder/` give token states (`last_hidden_state`) of an image
or a sound as `encoder_hidden_states` in the same way; `conditioning.json` lists each component's
hidden layer, length, width, pooled embedding and, where a CLIP stage trained one, its projection.
"""
