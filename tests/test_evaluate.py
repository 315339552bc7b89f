"""`selfsup evaluate` and `selfsup embed` end to end with no recipe: a shard set built from a folder of
files (the img2dataset layout), a stage directory of tiny encoders with CLIP heads, every task,
and a report that validates against its schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.evaluation.report import validate
from tests.conftest import TINY, png

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    """48 images with caption, class and json in a plain folder, sharded by `selfsup shard`."""
    root = tmp_path_factory.mktemp("third_party")
    files = root / "files"
    files.mkdir()
    for i in range(48):
        c = i % 4
        (files / f"{i:04d}.png").write_bytes(png(i * 7 + c))
        (files / f"{i:04d}.txt").write_text(f"a {COLOURS[c]} square")
        (files / f"{i:04d}.cls").write_text(str(c))
        (files / f"{i:04d}.json").write_text(json.dumps({"colour": COLOURS[c]}))
    assert main(["shard", str(files), "--out", str(root / "shards"), "--max-count", "16"]) == 0
    return root / "shards"


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, starter_tokenizer) -> Path:
    """A pretrain-stage layout: encoders/image, encoders/text (tiny, untrained) and heads/clip."""
    from modalities.image import ImageConfig
    from modalities.image import Modality as Image
    from modalities.text import Modality as Text
    from modalities.text import TextConfig
    from pipeline.encoders import saved
    from pipeline.encoders.base import EncoderConfig
    from pipeline.objectives import clip

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run") / "clip_stage"
    image, text = Image(ImageConfig(size=16)), Text(TextConfig(tokenizer=starter_tokenizer, max_length=16))
    encoders = {"image": image.encoder(EncoderConfig(**TINY)), "text": text.encoder(EncoderConfig(**TINY))}
    saved.save(encoders["image"], image, out / "encoders" / "image")
    saved.save(encoders["text"], text, out / "encoders" / "text")
    objective = clip.Objective(clip.Config(), encoders, "clip")
    saved.save_heads(objective, "clip", out / "heads" / "clip",
                     {k: v for k, v in objective.state_dict().items() if not k.startswith("encoders.")})
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 - s / 10}) + "\n" for s in range(5)))
    return out


def test_evaluate_every_task_with_no_recipe(folder_shards, stage_dir, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards),
               "--task", "knn,linear_probe,zero_shot,retrieval", "--class-key", "colour", "--out", str(out),
               "--evaluators", "{linear_probe: {Cs: [1.0]}}"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    validate(rep)
    seen = {(e["task"], e["encoder"].split("/")[-1]) for e in rep["entries"]}
    assert {("knn", "image"), ("linear_probe", "image"), ("knn", "text"), ("linear_probe", "text"),
            ("zero_shot", "image"), ("retrieval", "image+text")} <= seen
    for e in rep["entries"]:
        assert set(e["baselines"]) == {"random_init", "raw_input", "chance"}
        assert e["interval"] is not None and e["interval"][0] <= e["value"] <= e["interval"][1] + 1e-9
        if e["task"] in ("knn", "linear_probe"):
            assert e["baselines"]["random_init"] is not None and e["baselines"]["raw_input"] is not None
    # captions name the class: tf-idf of the text separates the four classes perfectly
    text_probe = next(e for e in rep["entries"] if e["task"] == "linear_probe" and e["encoder"].endswith("text"))
    assert text_probe["baselines"]["raw_input"] == 1.0
    r1 = next(e for e in rep["entries"] if e["metric"] == "text_to_image_R@1")
    assert r1["baselines"]["chance"] == pytest.approx(12 / 48, abs=0.02)  # 4 captions, 12 positives each of 48
    html = (out / "report.html").read_text()
    assert "<img" in html and "http" not in html.split("<body", 1)[1].replace("http://www.w3.org", "")


def test_unknown_task_and_inapplicable_task_are_one_line(folder_shards, stage_dir, tmp_path, capsys):
    assert main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards), "--task", "knnn",
                 "--out", str(tmp_path / "a")]) == 2
    assert "did you mean knn" in capsys.readouterr().err
    # no class names: zero-shot applies to nothing
    assert main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards), "--task", "zero_shot",
                 "--out", str(tmp_path / "b")]) == 2
    assert "zero_shot" in capsys.readouterr().err


def test_embed_command_and_cache_agree(folder_shards, stage_dir, tmp_path):
    from safetensors.numpy import load_file

    from pipeline.evaluation.embed import embed

    out = tmp_path / "f.safetensors"
    assert main(["embed", "--encoders", str(stage_dir), "--data", str(folder_shards), "--out", str(out)]) == 0
    tensors, side = load_file(str(out)), json.loads(out.with_suffix(".json").read_text())
    assert tensors["image.x"].shape == (48, 32) and tensors["text.x"].shape == (48, 32)
    assert side["keys"] == sorted(side["keys"])  # shard order: the folder's sorted stems
    assert [w[1] for w in side["where"]][:16] == list(range(16))
    first = embed(stage_dir, str(folder_shards), space="clip", cache_dir=tmp_path / "c", progress=False)
    again = embed(stage_dir, str(folder_shards), space="clip", cache_dir=tmp_path / "c", progress=False)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    np.testing.assert_allclose(np.linalg.norm(first.features["image"].x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first.features["text"].x, again.features["text"].x)
    assert first.features["image"].texts[0] == "a red square"


@pytest.mark.slow
def test_embed_under_two_processes_gathers_the_same_rows_as_one(folder_shards, stage_dir, tmp_path):
    """Under ``accelerate launch`` each process embeds its share and process 0 writes them all, in
    shard order: the same keys, positions and features as one process."""
    from conftest import launch_two
    from safetensors.numpy import load_file

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert main(["embed", "--encoders", str(stage_dir), "--data", str(folder_shards), "--out", str(one)]) == 0
    launch_two("-m", "pipeline.cli", "embed", "--encoders", str(stage_dir), "--data", str(folder_shards),
               "--out", str(two))
    a, b = load_file(str(one)), load_file(str(two))
    side_a, side_b = (json.loads(p.with_suffix(".json").read_text()) for p in (one, two))
    assert side_a["keys"] == side_b["keys"] and side_a["where"] == side_b["where"]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_holdout_validates_on_the_part_a_recipe_source_holds_out(folder_shards, stage_dir, tmp_path, capsys):
    """``--holdout`` tests on exactly the samples a source with the same ``holdout`` leaves out of
    pretraining, and trains the probes on the rest; by a json field, whole groups stay together."""
    from pipeline.data.loader import SourceConfig
    from pipeline.data.shards import iter_samples, open_shards
    from pipeline.evaluation.embed import embed

    samples = [s for sh in open_shards(str(folder_shards)).shards for s in iter_samples(sh.path)]
    for by, share in ((None, 0.3), ("colour", 0.75)):  # 0.75: blue of the four colours
        src = SourceConfig(shards=str(folder_shards), modalities=["image"], holdout=share, holdout_by=by)
        held = {s["__key__"] for s in samples if not src.wanted(s)}
        parts = {part: set(embed(stage_dir, str(folder_shards), modalities=["image"], progress=False,
                                 split={"holdout": share, "holdout_by": by, "part": part}).features["image"].keys)
                 for part in ("holdout", "rest")}
        assert parts["holdout"] == held and 0 < len(held) < 48
        assert parts["rest"] == {s["__key__"] for s in samples} - held
        if by:
            assert {json.loads(s["json"])["colour"] for s in samples if s["__key__"] in held} == {"blue"}
    out = tmp_path / "val"
    assert main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards), "--holdout", "0.3",
                 "--task", "knn", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    validate(rep)
    src = SourceConfig(shards=str(folder_shards), modalities=["image"], holdout=0.3)
    rest = sum(src.wanted(s) for s in samples)
    knn = [e for e in rep["entries"] if e["task"] == "knn"]
    assert knn and all(e["n_train"] == rest and e["data"].endswith("(held out 30%)") for e in knn)
    assert rep["runs"]["holdout"] == [{"holdout": 0.3, "holdout_by": None}]
    # misuse is one line naming the setting
    assert main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards), "--holdout", "0.3",
                 "--train-data", str(folder_shards), "--task", "knn", "--out", str(tmp_path / "x")]) == 2
    assert "evaluate.holdout" in capsys.readouterr().err
    assert main(["evaluate", "--encoders", str(stage_dir), "--data", str(folder_shards), "--holdout", "0.3",
                 "--holdout-by", "speaker", "--task", "knn", "--out", str(tmp_path / "y")]) != 0
    assert "'speaker'" in capsys.readouterr().err
