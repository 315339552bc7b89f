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


def test_image_processor_reproduces_eval_preprocessing(tmp_path, starter_tokenizer):
    from PIL import Image
    from transformers import AutoImageProcessor

    from pipeline.export.transformers_models import image_processor

    mod = registry.modality("image")(_mods(starter_tokenizer)["image"])
    image_processor(mod).save_pretrained(str(tmp_path))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path))
    import io
    import tarfile
    tar = sorted((STARTER / "emoji" / "test").glob("*.tar"))[0]
    with tarfile.open(tar) as t:
        pngs = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")][:8]
    imgs = [mod.decode(p, "png") for p in pngs]
    ours = mod.collate([mod.transform(i, None) for i in imgs])
    theirs = proc(images=[Image.open(io.BytesIO(p)).convert("RGB") for p in pngs], return_tensors="pt")["pixel_values"]
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_dual_encoder_equals_clip_features(tmp_path, starter_tokenizer, batches):
    from transformers import AutoModel

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
