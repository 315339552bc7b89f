"""The finetune evaluator: a head trained by the one loop, saved as a stock transformers classifier
that ``transformers.pipeline`` runs with the evaluator's own predictions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from pipeline.data.writer import write_shards


def colour_shards(out: Path, n: int, offset: int) -> Path:
    """Images whose colour is their class (4 classes, ids 3, 5, 7, 9), with pixel noise."""
    base = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])

    def sample(i):
        rng = np.random.default_rng(offset + i)
        arr = np.clip(base[i % 4] + rng.integers(-40, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return {"__key__": f"k{offset + i:05d}", "png": buf.getvalue(), "cls": str(3 + 2 * (i % 4)).encode()}

    write_shards(list(range(n)), sample, out, max_count=16, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from modalities.image import ImageConfig
    from modalities.image import Modality as Img
    from pipeline.encoders import saved
    from pipeline.encoders.base import EncoderConfig
    from pipeline.evaluators import finetune

    root = tmp_path_factory.mktemp("ft")
    train, test = colour_shards(root / "train", 64, 0), colour_shards(root / "test", 24, 1000)
    mod = Img(ImageConfig(size=12))
    enc = mod.encoder(EncoderConfig(**TINY))
    saved.save(enc, mod, root / "enc" / "encoders" / "image")
    cfg = finetune.Config(frozen=False, steps=30, lr=3e-3, batch_size=16)
    names = {3: "red", 5: "green", 7: "blue", 9: "yellow"}
    metrics = finetune.run(cfg, root / "enc", "image", str(train), str(test), "cls", root / "head", id2label=names)
    return root, metrics


def test_separable_colours_are_learned(image_run):
    _, metrics = image_run
    top1 = next(m for m in metrics if m.name == "top1")
    assert top1.task == "finetune" and top1.n == 24 and top1.chance == 0.25
    assert top1.value >= 0.9, top1
    assert top1.interval[0] <= top1.value <= top1.interval[1]


def test_stock_pipeline_reproduces_predictions(image_run):
    from transformers import AutoModelForImageClassification, pipeline

    from pipeline.data.shards import iter_samples, open_shards

    root, _ = image_run
    model = AutoModelForImageClassification.from_pretrained(root / "head")
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.id2label == {0: "red", 1: "green", 2: "blue", 3: "yellow"}
    ours = {r["key"]: r["predicted"] for r in map(json.loads, (root / "head" / "predictions.jsonl").open())}
    clf = pipeline("image-classification", model=str(root / "head"), device="cpu")
    images, keys = [], []
    for shard in open_shards(str(root / "test")).shards:
        for s in iter_samples(shard.path):
            images.append(Image.open(io.BytesIO(s["png"])))
            keys.append(s["__key__"])
    theirs = [out[0]["label"] for out in clf(images, top_k=1)]
    assert len(keys) == len(ours) == 24
    assert theirs == [ours[k] for k in keys]


def test_text_head_runs_in_a_stock_text_pipeline(tmp_path, starter_tokenizer):
    from transformers import AutoModelForSequenceClassification, pipeline

    from modalities.text import Modality as Text
    from modalities.text import TextConfig
    from pipeline.encoders import saved
    from pipeline.encoders.base import EncoderConfig
    from pipeline.evaluators import finetune

    words = [["dog", "cat", "horse"], ["river", "sea", "lake"]]

    def sample(i, offset):
        rng = np.random.default_rng(offset + i)
        text = " ".join(rng.choice(words[i % 2], 3))
        return {"__key__": f"t{offset + i:05d}", "txt": text.encode(), "cls": str(i % 2).encode()}

    for name, n, off in (("train", 48, 0), ("test", 16, 500)):
        write_shards(list(range(n)), lambda i, off=off: sample(i, off), tmp_path / name, max_count=16, workers=1,
                     progress=False)
    mod = Text(TextConfig(tokenizer=starter_tokenizer, max_length=16))
    saved.save(mod.encoder(EncoderConfig(**TINY)), mod, tmp_path / "enc")
    metrics = finetune.run(finetune.Config(frozen=False, steps=40, lr=3e-3, batch_size=16), tmp_path / "enc", "text",
                           str(tmp_path / "train"), str(tmp_path / "test"), "cls", tmp_path / "head",
                           id2label={0: "animal", 1: "water"})
    assert [m.name for m in metrics] == ["top1"] and metrics[0].value >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "head")
    assert type(model).__name__ == "BertForSequenceClassification"
    rows = [json.loads(r) for r in (tmp_path / "head" / "predictions.jsonl").open()]
    texts = {}
    from pipeline.data.shards import iter_samples, open_shards

    for shard in open_shards(str(tmp_path / "test")).shards:
        texts.update({s["__key__"]: s["txt"].decode() for s in iter_samples(shard.path)})
    clf = pipeline("text-classification", model=str(tmp_path / "head"), device="cpu")
    assert [o["label"] for o in clf([texts[r["key"]] for r in rows])] == [r["predicted"] for r in rows]


def test_layer_decay_scales_each_layer(tmp_path):
    from modalities.image import ImageConfig
    from modalities.image import Modality as Img
    from pipeline.encoders.base import EncoderConfig
    from pipeline.objectives import classify
    from pipeline.train.learner import Learner
    from pipeline.train.loop import param_groups

    enc = Img(ImageConfig(size=12)).encoder(EncoderConfig(**{**TINY, "num_layers": 2}))
    obj = classify.Objective(classify.Config(classes=[0, 1], frozen=False, layer_decay=0.5), {"image": enc})
    groups = param_groups(Learner({"image": enc}, {"classify": obj}), 0.05)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(obj.classifier.weight)] == 1.0
    assert scale[id(next(enc.layers[1].parameters()))] == 0.5
    assert scale[id(next(enc.layers[0].parameters()))] == 0.25
    assert scale[id(enc.model.embeddings.patch_embeddings.projection.weight)] == 0.125
    frozen = classify.Objective(classify.Config(classes=[0, 1]), {"image": Img(ImageConfig(size=12)).encoder(
        EncoderConfig(**TINY))})
    assert {id(p) for g in param_groups(frozen, 0.05) for p in g["params"]} == {id(p) for p in frozen.classifier.parameters()}


def test_audio_head_is_a_stock_vit_over_log_mel(tmp_path):
    """An audio head loads with ``AutoModelForImageClassification`` and, fed the pipeline's
    log-mel path (README), predicts what the evaluator predicted."""
    import torch
    from conftest import STARTER
    from transformers import AutoModelForImageClassification

    from modalities.audio import AudioConfig
    from modalities.audio import Modality as Audio
    from pipeline.data.shards import iter_samples, open_shards
    from pipeline.encoders import saved
    from pipeline.encoders.base import EncoderConfig
    from pipeline.evaluators import finetune

    speech = str(STARTER / "speech" / "test")
    mod = Audio(AudioConfig(n_mels=32, clip_seconds=0.5))
    saved.save(mod.encoder(EncoderConfig(**TINY)), mod, tmp_path / "enc")
    finetune.run(finetune.Config(frozen=False, steps=3, batch_size=16), tmp_path / "enc", "audio", speech, speech,
                 "cls", tmp_path / "head")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "head").eval()
    ours = {r["key"]: r["predicted"] for r in map(json.loads, (tmp_path / "head" / "predictions.jsonl").open())}
    shard = open_shards(speech).shards[0]
    keys, waves = [], []
    for s in list(iter_samples(shard.path))[:16]:
        ext = next(e for e in ("flac", "wav") if s.get(e))
        keys.append(s["__key__"])
        waves.append(mod.transform(mod.decode(s[ext], ext), None))
    x = mod.collate(waves)[..., : model.config.image_size[1]]
    with torch.no_grad():
        pred = model(pixel_values=x).logits.argmax(-1).tolist()
    assert [model.config.id2label[p] for p in pred] == [ours[k] for k in keys]
