"""The finetune evaluator: a head trained by the one loop, saved as a stock transformers classifier
that ``transformers.pipeline`` runs with the evaluator's own predictions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import write_shards
from tests.conftest import TINY


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
