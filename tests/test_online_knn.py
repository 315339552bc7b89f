"""Online kNN during pretraining: ``eval_every`` logs a kNN probe on a held-out labelled source."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from test_finetune import colour_shards

from modalities.image import ImageConfig
from pipeline.config import ConfigError
from pipeline.data.loader import SourceConfig


def _stage(tmp_path, data, **kw):
    from pipeline.stage import Context
    from stages import pretrain

    cfg = pretrain.Config(sources=["imgs"], objectives={"mae": {"decoder_width": 32, "decoder_heads": 2}},
                          encoders={"image": TINY}, steps=4, log_every=3, loader={"batch_size": 8, "num_workers": 0},
                          **kw)
    held = colour_shards(tmp_path / "held", 32, 0)
    ctx = Context(out_dir=tmp_path / "pt", progress=False, modalities={"image": ImageConfig(size=12)},
                  sources={"imgs": SourceConfig(shards=str(data), modalities=["image"]),
                           "held": SourceConfig(shards=str(held), modalities=["image"], label="cls")})
    ctx.out_dir.mkdir()
    return cfg, ctx


def test_eval_every_logs_knn_to_metrics_and_tensorboard(data, tmp_path):
    from stages import pretrain

    cfg, ctx = _stage(tmp_path, data, eval_every=2, eval_source="held", eval_samples=32)
    pretrain.run(cfg, ctx)
    rows = [json.loads(x) for x in (ctx.out_dir / "metrics.jsonl").read_text().splitlines()]
    probed = {r["step"]: r["knn/image/top1"] for r in rows if "knn/image/top1" in r}
    assert sorted(probed) == [2, 4]
    # colour is the class: even a barely trained ViT's features separate it far above chance (0.25)
    assert all(v >= 0.6 for v in probed.values()), probed
    assert "loss" in next(r for r in rows if r["step"] == 2)  # a step off log_every is logged whole
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(ctx.out_dir / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("knn/image/top1")] == [2, 4]


def test_eval_source_trained_on_is_refused(data, tmp_path):
    from stages import pretrain

    cfg, ctx = _stage(tmp_path, data, eval_every=2, eval_source="imgs")
    with pytest.raises(ConfigError, match="eval_source: imgs is also trained on"):
        pretrain.run(cfg, ctx)
