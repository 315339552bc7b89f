"""The pretrain stage: stock encoders out, mixtures of sources and objectives, settings checked
when the recipe loads, a health stop as one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from modalities.image import ImageConfig
from pipeline.config import ConfigError
from pipeline.data.loader import SourceConfig
from pipeline.train.health import HealthError


def test_pretrain_stage_writes_encoders_stock_classes_load(data, tmp_path):
    """The encoders a pretrain stage leaves load with ``AutoModel`` and compute what it trained."""
    from transformers import AutoModel

    from pipeline.stage import Context
    from stages import pretrain

    cfg = pretrain.Config(sources=["imgs"], objectives={"mae": {"decoder_width": 32, "decoder_heads": 2}},
                          encoders={"image": TINY}, steps=3, loader={"batch_size": 8, "num_workers": 0})
    ctx = Context(out_dir=tmp_path / "pt", sources={"imgs": SourceConfig(shards=str(data), modalities=["image"])},
                  modalities={"image": ImageConfig(size=16)}, progress=False)
    ctx.out_dir.mkdir()
    summary = pretrain.run(cfg, ctx)
    assert summary["step"] == 3 and (tmp_path / "pt" / "checkpoints" / "step_00000003").is_dir()
    model = AutoModel.from_pretrained(tmp_path / "pt" / "encoders" / "image")
    weights = load_file(tmp_path / "pt" / "checkpoints" / "step_00000003" / "model.safetensors")
    # stock ViTModel adds a pooler the encoder never uses (its pooled embedding is its own)
    exported = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    assert exported and all(torch.equal(v, weights[f"encoders.image.model.{k}"]) for k, v in exported.items())


def test_several_objectives_on_a_mixture_of_sources(data, tmp_path, starter_tokenizer):
    """MAE on an image source and MLM on a text source in one stage: each batch trains the
    objective whose modality it holds, in the proportion of the source weights."""
    from conftest import STARTER

    from modalities.text import TextConfig
    from pipeline.stage import Context
    from stages import pretrain

    cfg = pretrain.Config(sources={"imgs": 1.0, "glosses": 1.0}, objectives={"mae": {"decoder_width": 32, "decoder_heads": 2},
                                                                              "mlm": {"weight": 0.5}},
                          encoders={"image": TINY, "text": TINY}, steps=12, log_every=1,
                          loader={"batch_size": 4, "num_workers": 0})
    sources = {"imgs": SourceConfig(shards=str(data), modalities=["image"]),
               "glosses": SourceConfig(shards=str(STARTER / "wordnet" / "test"), modalities=["text"])}
    ctx = Context(out_dir=tmp_path / "pt", sources=sources, progress=False,
                  modalities={"image": ImageConfig(size=16), "text": TextConfig(tokenizer=starter_tokenizer, max_length=24)})
    ctx.out_dir.mkdir()
    assert pretrain.run(cfg, ctx)["step"] == 12
    lines = [json.loads(x) for x in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    mae_steps = [x["step"] for x in lines if "mae/loss" in x]
    mlm_steps = [x["step"] for x in lines if "mlm/loss" in x]
    assert mae_steps and mlm_steps and sorted(mae_steps + mlm_steps) == list(range(1, 13))
    assert all(x["loss"] == pytest.approx(0.5 * x["mlm/loss"], rel=1e-4) for x in lines if "mlm/loss" in x)
    assert {p.name for p in (tmp_path / "pt" / "encoders").iterdir()} == {"image", "text"}


@pytest.mark.parametrize("objectives, message", [
    ({"mea": {}}, r"objectives: unknown objective 'mea' \(did you mean 'mae'\?\)"),
    ({"mae": {"mask_ratoi": 0.5}}, r"objectives.mae \(mae\): unknown key 'mask_ratoi' \(did you mean 'mask_ratio'\?\)"),
    ({"mae": {"mask_ratio": 1.5}}, r"objectives.mae \(mae\): mask_ratio: Input should be less than 1 \(got 1.5\)$"),
    ({"d2v": {"objective": "data2vec", "ema_strat": 0.9}}, r"objectives.d2v \(data2vec\): unknown key 'ema_strat'"),
])
def test_objective_settings_are_checked_when_the_stage_config_is_built(objectives, message):
    from pipeline.config import build
    from stages import pretrain

    with pytest.raises(ConfigError, match=message):
        build(pretrain.Config, {"sources": ["x"], "objectives": objectives}, "recipe.yaml: stages.pt")


def test_a_health_stop_is_one_line_and_exit_status_1(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main
    from stages import pretrain

    def stopped(cfg, ctx):
        raise HealthError("step 30: loss is nan; stopped, last good checkpoint: runs/x/checkpoints/step_00000020")

    monkeypatch.setattr(pretrain, "run", stopped)
    status = main(["pretrain", "--sources", "[x]", "--objectives", "{mae: {}}", "--out", str(tmp_path / "pt")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err == ("selfsup: stopped: step 30: loss is nan; stopped, last good checkpoint: "
                                   "runs/x/checkpoints/step_00000020")
