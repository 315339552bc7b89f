"""Export: stock transformers reloads with parity, the dual encoder equals the CLIP features, the
diffusion conditioning runs a stock diffusers pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import registry
from pipeline.encoders.base import EncoderConfig
from tests.conftest import STARTER

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


def _mods(tokenizer):
    return {"image": registry.modality("image").Config(size=16, channels=3),
            "text": registry.modality("text").Config(tokenizer=tokenizer, max_length=16),
            "audio": registry.modality("audio").Config(n_mels=16, clip_seconds=0.5)}


@pytest.fixture(scope="module")
def batches(starter_tokenizer):
    from pipeline.export.samples import batch

    m = _mods(starter_tokenizer)
    return {"emoji": batch(str(STARTER / "emoji" / "test"), {"image": m["image"], "text": m["text"]}),
            "speech": batch(str(STARTER / "speech" / "test"), {"audio": m["audio"]})}


def _encoder(name, cfg, pooling="cls"):
    torch.manual_seed(0)
    mod = registry.modality(name)(cfg)
    return mod, mod.encoder(EncoderConfig(**TINY, patch_size=4, pooling=pooling))


@pytest.mark.parametrize("name,source", [("image", "emoji"), ("text", "emoji"), ("audio", "speech")])
def test_automodel_reload_has_every_weight_and_parity(tmp_path, starter_tokenizer, batches, name, source):
    from transformers import AutoModel

    from pipeline.encoders import saved
    from pipeline.export.transformers_models import export_encoder, hidden_parity

    mod, enc = _encoder(name, _mods(starter_tokenizer)[name])
    export_encoder(enc, mod, tmp_path / name)
    model, info = AutoModel.from_pretrained(str(tmp_path / name), output_loading_info=True)
    assert not any(info.values()), info
    diff = hidden_parity(enc, model.eval(), batches[source][name])
    assert diff <= 1e-5
    _, again = saved.load(tmp_path / name)  # the pipeline reloads it like a stage's encoder dir
    assert hidden_parity(again, model, batches[source][name]) <= 1e-5


def _emoji_pngs(n: int = 8) -> list[bytes]:
    """The first ``n`` PNG files of the emoji test shards (32×32 RGB)."""
    import tarfile

    tar = min((STARTER / "emoji" / "test").glob("*.tar*"))
    with tarfile.open(tar) as t:
        return [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")][:n]


def test_image_processor_reproduces_eval_preprocessing(tmp_path, starter_tokenizer):
    from PIL import Image
    from transformers import AutoImageProcessor

    from pipeline.export.transformers_models import image_processor

    mod = registry.modality("image")(_mods(starter_tokenizer)["image"])
    image_processor(mod).save_pretrained(str(tmp_path))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path))
    import io
    pngs = _emoji_pngs()
    imgs = [mod.decode(p, "png") for p in pngs]
    ours = mod.collate([mod.transform(i, None) for i in imgs])
    theirs = proc(images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")["pixel_values"]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_dual_encoder_equals_clip_features(tmp_path, starter_tokenizer, batches):
    from transformers import AutoModel, AutoTokenizer

    from pipeline.export import dual_encoder
    from pipeline.objectives import clip

    m = _mods(starter_tokenizer)
    (imod, ienc), (tmod, tenc) = _encoder("image", m["image"]), _encoder("text", m["text"])
    obj = clip.Objective(clip.Config(), {"image": ienc, "text": tenc}).eval()
    dual_encoder.export(obj, tmp_path / "clip", tmod, imod)
    model, info = AutoModel.from_pretrained(str(tmp_path / "clip"), output_loading_info=True)
    assert type(model).__name__ == "VisionTextDualEncoderModel" and not any(info.values()), info
    diffs = dual_encoder.parity(obj, model.eval(), batches["emoji"])
    assert max(diffs.values()) <= 1e-5, diffs
    json.dumps(diffs)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "clip")).model_max_length == 16  # cut where training cut


def _unet(cross: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross,
                                attention_head_dim=8, norm_num_groups=8)


def test_stock_stable_diffusion_pipeline_runs_the_exported_text_encoder(tmp_path, starter_tokenizer):
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline

    from pipeline.export import conditioning

    m = _mods(starter_tokenizer)
    info = conditioning.export({"text": _encoder("text", m["text"])}, tmp_path / "conditioning")
    text = info["components"]["text_encoder"]
    root = tmp_path / "sd"
    root.mkdir()
    for part in ("text_encoder", "tokenizer"):
        (root / part).symlink_to(tmp_path / "conditioning" / part)
    _unet(text["cross_attention_dim"]).save_pretrained(str(root / "unet"))
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(str(root / "vae"))
    DDIMScheduler(steps_offset=1, clip_sample=False).save_pretrained(str(root / "scheduler"))
    tok_class = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text()).get("tokenizer_class",
                                                                                              "PreTrainedTokenizerFast")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", text["class"]], "tokenizer": ["transformers", tok_class],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}))
    pipe = DiffusionPipeline.from_pretrained(str(root), safety_checker=None)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.tokenizer.model_max_length == 16
    calls = []
    pipe.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(out[0].shape))
    out = pipe("a red apple", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3) and calls and calls[0][-2:] == (16, text["hidden_size"])


def test_image_tokens_condition_the_unet(tmp_path, starter_tokenizer, batches):
    from diffusers import DDIMScheduler
    from transformers import AutoModel

    from pipeline.export import conditioning

    m = _mods(starter_tokenizer)
    info = conditioning.export({"image": _encoder("image", m["image"])}, tmp_path / "conditioning")
    entry = info["components"]["image_encoder"]
    encoder = AutoModel.from_pretrained(str(tmp_path / "conditioning" / entry["path"])).eval()
    with torch.no_grad():
        states = encoder(pixel_values=batches["emoji"]["image"][:2]).last_hidden_state
    assert states.shape == (2, entry["sequence_length"], entry["cross_attention_dim"])
    unet, sched = _unet(entry["cross_attention_dim"]).eval(), DDIMScheduler()
    sched.set_timesteps(2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for cond in (states, torch.zeros_like(states)):
        z = x
        with torch.no_grad():
            for t in sched.timesteps:
                z = sched.step(unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        outs.append(z)
    assert torch.isfinite(outs[0]).all() and (outs[0] - outs[1]).abs().max() > 1e-4  # the tokens steer it


def _stage(tmp_path, name, pairs, starter_tokenizer, pooling="cls"):
    """A pretrain-stage directory of tiny encoders and CLIP heads, written by the pipeline's own savers."""
    from pipeline.encoders import saved
    from pipeline.objectives import clip

    m = _mods(starter_tokenizer)
    built = {k: _encoder(k, m[k], pooling) for k in pairs}
    for k, (mod, enc) in built.items():
        saved.save(enc, mod, tmp_path / name / "encoders" / k)
    obj = clip.Objective(clip.Config(modalities=list(pairs)), {k: e for k, (_, e) in built.items()})
    saved.save_heads(obj, "clip", tmp_path / name / "heads" / "clip", obj.state_dict())
    return tmp_path / name


def test_export_stage_writes_every_piece_with_parity(tmp_path, starter_tokenizer):
    from transformers import AutoModel, AutoTokenizer

    from pipeline.data.loader import SourceConfig
    from pipeline.stage import Context
    from stages import export

    a = _stage(tmp_path, "clip_image_text", ["image", "text"], starter_tokenizer)
    b = _stage(tmp_path, "clip_audio_text", ["audio", "text"], starter_tokenizer)
    cfg = export.Config(stages=[str(b), str(a)], encoders={"text": str(a)},
                        data=[SourceConfig(shards=str(STARTER / "emoji" / "test"), modalities=["image", "text"]),
                              SourceConfig(shards=str(STARTER / "speech" / "test"), modalities=["audio", "text"])])
    out = tmp_path / "export"
    summary = export.run(cfg, Context(out_dir=out, progress=False))
    assert summary["exported"] == ["audio", "clip_audio_text", "clip_image_text", "image", "text"]
    parity = json.loads((out / "parity.json").read_text())["max_abs_diff"]
    assert all(v <= 1e-5 for d in parity.values() for v in d.values()), parity
    assert {"image", "text", "open_clip_image", "open_clip_text"} <= set(parity["clip_image_text"])
    for part in ("image", "text", "audio", "clip_image_text"):
        _, info = AutoModel.from_pretrained(str(out / part), output_loading_info=True)
        assert not any(info.values()) and (out / part / "README.md").is_file()
    assert (out / "clip_audio_text" / "heads" / "clip" / "heads.safetensors").is_file()
    cond = json.loads((out / "conditioning" / "conditioning.json").read_text())["components"]
    assert cond["text_encoder"]["pooled_projection"]["clip"] == "clip_image_text"
    assert "Training data and licences" in (out / "text" / "README.md").read_text()
    for part in ("text", "clip_image_text", "clip_image_text/open_clip_text", "conditioning/text_encoder",
                 "conditioning/tokenizer"):
        assert AutoTokenizer.from_pretrained(str(out / part)).model_max_length == 16, part  # cut where training cut


def test_open_clip_model_equals_clip_features(tmp_path, starter_tokenizer, batches):
    import open_clip

    from pipeline.export import open_clip_model

    obj, _, tmod = _open_clip_export(tmp_path, starter_tokenizer)
    model, _ = open_clip_model.load(tmp_path / "clip")
    diffs = open_clip_model.parity(obj, model, batches["emoji"])
    assert max(diffs.values()) <= 1e-5, diffs
    assert _open_clip_text_diff(obj, tmod, model, open_clip.get_tokenizer("open_clip_config")) <= 1e-5


def _open_clip_export(tmp_path, starter_tokenizer):
    """(CLIP objective of tiny towers, image modality, text modality), the objective exported for
    open_clip to ``tmp_path/clip`` with its text tower in ``tmp_path/text``."""
    from pipeline.export import open_clip_model
    from pipeline.export.transformers_models import export_encoder
    from pipeline.objectives import clip

    m = _mods(starter_tokenizer)
    (imod, ienc), (tmod, tenc) = _encoder("image", m["image"]), _encoder("text", m["text"])
    obj = clip.Objective(clip.Config(), {"image": ienc, "text": tenc}).eval()
    export_encoder(tenc, tmod, tmp_path / "text")
    open_clip_model.export(obj, tmp_path / "clip", tmp_path / "text", imod)
    return obj, imod, tmod


def _padded(png: bytes, left: int, right: int, top: int, bottom: int):
    """The image of ``png`` on a larger black canvas: a non-square image whose crop shows the border."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    out = Image.new("RGB", (img.width + left + right, img.height + top + bottom))
    out.paste(img, (left, top))
    return out


@torch.no_grad()
def test_open_clip_preprocess_reproduces_eval_preprocessing(tmp_path, starter_tokenizer, monkeypatch):
    """open_clip's own eval ``preprocess`` of PIL images (plain open_clip inside the export, and
    ``load`` from anywhere) is the pipeline's eval transform, and the features of its pixels are the
    pipeline's CLIP features. Equal on square images and on non-square ones whose center crop falls
    on whole pixels of the resized image (32×32 → 16×16; 44×32 → 22×16, crop from x = 3); elsewhere
    open_clip crops after resizing at a rounded offset, a sub-pixel shift, bounded here as measured."""
    import open_clip
    import torch.nn.functional as F

    from pipeline.export import open_clip_model

    obj, imod, _ = _open_clip_export(tmp_path, starter_tokenizer)
    model, preprocess = open_clip_model.load(tmp_path / "clip")
    monkeypatch.chdir(tmp_path / "clip")
    _, _, plain = open_clip.create_model_and_transforms("local-dir:.")
    pngs = _emoji_pngs()

    def both(pads):
        imgs = [_padded(p, *pads) for p in pngs]
        ours = imod.collate([imod.transform(imod.decode(imod.encode(i)[1], "png"), None) for i in imgs])
        return ours, [torch.stack([pre(i) for i in imgs]) for pre in (preprocess, plain)]

    for pads in [(0, 0, 0, 0), (4, 8, 0, 0), (0, 0, 6, 6)]:  # 32×32, 44×32, 32×44
        ours, theirs = both(pads)
        for pixels in theirs:
            assert pixels.shape == ours.shape and (pixels - ours).abs().max().item() <= 1e-6, pads
        features = F.normalize(model.encode_image(theirs[1]), dim=-1)
        assert (features - obj.features({"image": ours}, "image")).abs().max().item() <= 1e-5, pads
    for pads in [(5, 5, 0, 0), (3, 0, 0, 0), (0, 0, 0, 13)]:  # 42×32, 35×32, 32×45: the grid shifts
        ours, theirs = both(pads)  # mean |difference| 0.12, 0.15, 0.03 of the [-1, 1] range; max 1.1
        assert all((pixels - ours).abs().mean().item() <= 0.2 for pixels in theirs), pads


#: longer than the 16 tokens the text tower trains on
LONG = "a grinning face with big eyes beside a red apple on a wooden table under the light of a sunny morning"


@torch.no_grad()
def _open_clip_text_diff(obj, tmod, model, tokenizer) -> float:
    """Max abs difference of raw texts' features through open_clip's own tokenizer vs the pipeline's."""
    import torch.nn.functional as F

    texts = ["a red apple", LONG]
    assert len(tmod.transform(LONG, None)) == tmod.cfg.max_length  # cut by the pipeline
    ours = obj.features({"text": tmod.collate([tmod.transform(t, None) for t in texts])}, "text")
    return (F.normalize(model.encode_text(tokenizer(texts)), dim=-1) - ours).abs().max().item()


def test_mean_pooled_image_text_clip_falls_back_to_the_stage_layout(tmp_path, starter_tokenizer):
    from pipeline.data.loader import SourceConfig
    from pipeline.stage import Context
    from stages import export

    a = _stage(tmp_path, "clip_mean", ["image", "text"], starter_tokenizer, pooling="mean")
    cfg = export.Config(stages=[str(a)], data=[SourceConfig(shards=str(STARTER / "emoji" / "test"),
                                                            modalities=["image", "text"])])
    export.run(cfg, Context(out_dir=tmp_path / "export", progress=False))
    parity = json.loads((tmp_path / "export" / "parity.json").read_text())["max_abs_diff"]["clip_mean"]
    assert max(parity.values()) <= 1e-5 and (tmp_path / "export" / "clip_mean" / "heads" / "clip").is_dir()


def test_open_clip_export_loads_after_the_directory_moves(tmp_path, starter_tokenizer, batches, monkeypatch):
    """The open_clip config names its text tower relative to itself: moved elsewhere, the export
    loads through ``register`` from anywhere, and through plain open_clip from inside the directory
    (``local-dir:.``), with the features it had where it was written."""
    import shutil

    import open_clip

    from pipeline.data.loader import SourceConfig
    from pipeline.export import open_clip_model
    from pipeline.stage import Context
    from stages import export

    a = _stage(tmp_path, "clip_image_text", ["image", "text"], starter_tokenizer)
    export.run(export.Config(stages=[str(a)], data=[SourceConfig(shards=str(STARTER / "emoji" / "test"),
                                                                 modalities=["image", "text"])]),
               Context(out_dir=tmp_path / "export", progress=False))

    @torch.no_grad()
    def features(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(["a red apple", LONG])
        return model.eval().encode_image(batches["emoji"]["image"], normalize=True), model.encode_text(tokens, normalize=True)

    here = tmp_path / "export" / "clip_image_text"
    before = features(open_clip_model.load(here)[0], open_clip.get_tokenizer(open_clip_model.register(here)))
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(here, tmp_path / "elsewhere" / "clip")
    shutil.rmtree(tmp_path / "export")
    text_cfg = json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "open_clip_text"
    after = features(open_clip_model.load(moved)[0], open_clip.get_tokenizer(f"local-dir:{moved}"))
    monkeypatch.chdir(moved)
    plain = features(open_clip.create_model_and_transforms("local-dir:.")[0], open_clip.get_tokenizer("local-dir:."))
    for got in (after, plain):
        assert max((b - g).abs().max().item() for b, g in zip(before, got)) <= 1e-5
