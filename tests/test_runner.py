"""Runner: resolved config in the run directory, skip when unchanged, rerun on change, continue an
interrupted stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.data.writer import write_shards
from pipeline.runner import DEFAULT_RECIPE, load_recipe, run_recipe

TEXTS = ["the red fox", "a blue sky", "green grass grows", "dogs bark at night", "cats sleep all day"] * 4


def setup(tmp_path: Path) -> Path:
    write_shards(list(range(len(TEXTS))), lambda i: {"__key__": f"t{i:03d}", "txt": TEXTS[i].encode()},
                 tmp_path / "texts", max_count=8, workers=1, progress=False)
    recipe = {
        "name": "tiny",
        "sources": {"texts": {"shards": "texts", "modalities": ["text"]}},
        "stages": [{"name": "check", "stage": "validate", "shards": ["texts"], "full": True},
                   {"name": "tokenize", "shards": ["texts"], "vocab_size": 60, "min_frequency": 1}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stamps(run: Path) -> dict[str, float]:
    return {d.name: (d / "done.json").stat().st_mtime_ns for d in run.iterdir() if (d / "done.json").is_file()}


def test_run_writes_resolved_config_and_skips_unchanged_stages(tmp_path, caplog):
    recipe = setup(tmp_path)
    run = run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    assert run == tmp_path / "runs" / "tiny"
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["seed"] == 0 and resolved["sources"]["texts"]["weight"] == 1.0  # defaults filled in
    assert yaml.safe_load((run / "tokenize" / "config.yaml").read_text())["kind"] == "wordpiece"
    done = json.loads((run / "check" / "done.json").read_text())
    assert done["summary"]["status"] == "ok" and len(done["hash"]) == 64
    first = stamps(run)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="selfsup"):
        run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    assert stamps(run) == first
    assert caplog.text.count("up to date, skipped") == 2


def test_changed_settings_or_inputs_rerun_what_depends_on_them(tmp_path):
    recipe = setup(tmp_path)
    run = run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    first = stamps(run)
    run_recipe(recipe, ["stages.tokenize.vocab_size=70"], runs=tmp_path / "runs", progress=False)
    second = stamps(run)
    assert second["check"] == first["check"] and second["tokenize"] != first["tokenize"]
    assert yaml.safe_load((run / "tokenize" / "config.yaml").read_text())["vocab_size"] == 70
    write_shards(list(range(5)), lambda i: {"__key__": f"n{i}", "txt": b"new words here"}, tmp_path / "texts",
                 max_count=8, workers=1, progress=False)  # the data changed: both stages are stale
    run_recipe(recipe, ["stages.tokenize.vocab_size=70"], runs=tmp_path / "runs", progress=False)
    third = stamps(run)
    assert third["check"] != second["check"] and third["tokenize"] != second["tokenize"]
    assert json.loads((run / "check" / "done.json").read_text())["summary"]["samples"] == 5


def test_interrupted_stage_continues_in_place_and_stale_one_is_cleared(tmp_path):
    recipe = setup(tmp_path)
    run = run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    (run / "tokenize" / "done.json").unlink()  # as if the process died before the stage finished
    (run / "tokenize" / "partial.ckpt").write_text("work done before the crash")
    run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    assert (run / "tokenize" / "partial.ckpt").exists() and (run / "tokenize" / "done.json").exists()
    (run / "tokenize" / "done.json").unlink()
    run_recipe(recipe, ["stages.tokenize.vocab_size=80"], runs=tmp_path / "runs", progress=False)
    assert not (run / "tokenize" / "partial.ckpt").exists()  # other settings: earlier partial work is stale


def test_only_and_force(tmp_path):
    recipe = setup(tmp_path)
    run = run_recipe(recipe, runs=tmp_path / "runs", only=["check"], progress=False)
    assert set(stamps(run)) == {"check"}
    first = stamps(run)
    assert main(["run", str(recipe), "--runs", str(tmp_path / "runs"), "--only", "check", "--force"]) == 0
    assert stamps(run)["check"] != first["check"]


def test_overrides_may_follow_options_and_a_stray_word_is_an_error(tmp_path, capsys):
    recipe = setup(tmp_path)
    runs = str(tmp_path / "runs")
    assert main(["run", str(recipe), "--runs", runs, "--only", "tokenize", "stages.tokenize.vocab_size=70"]) == 0
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "tokenize" / "config.yaml").read_text())["vocab_size"] == 70
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), "--runs", runs, "vocab_size"])
    assert e.value.code == 2 and "unrecognized arguments: vocab_size" in capsys.readouterr().err


def test_only_an_early_stage_needs_nothing_of_the_later_ones(tmp_path):
    """`--only check` before an export stage whose stage directories no stage has written yet."""
    recipe = setup(tmp_path)
    spec = yaml.safe_load(recipe.read_text())
    spec["stages"].append({"name": "export", "stages": ["pretrain_not_run_yet"]})
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["run", str(recipe), "--runs", str(tmp_path / "runs"), "--only", "check"]) == 0
    assert set(stamps(tmp_path / "runs" / "tiny")) == {"check"}
    with pytest.raises(ConfigError, match="pretrain_not_run_yet: not a stage directory"):
        run_recipe(recipe, runs=tmp_path / "runs", progress=False)


def test_failed_validation_fails_the_cli(tmp_path, capsys):
    setup(tmp_path)
    shard = tmp_path / "texts" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # checksum mismatch and a short last sample
    assert main(["validate", str(tmp_path / "texts"), "--out", str(tmp_path / "v")]) == 1
    assert "shard-000000.tar" in capsys.readouterr().out + (tmp_path / "v" / "report.json").read_text()


def test_starter_recipe_is_valid():
    recipe, modalities = load_recipe(DEFAULT_RECIPE)
    assert DEFAULT_RECIPE == REPO / "recipes" / "starter.yaml"
    assert recipe.name == "starter" and {"image", "text", "audio"} <= set(modalities)
    for source in recipe.sources.values():
        shards = source.shards if isinstance(source.shards, str) else source.shards[0]
        assert (DEFAULT_RECIPE.parent / shards / "manifest.json").is_file()


def test_learn_recipe_is_the_starter_with_more_budget():
    """``recipes/learn.yaml`` loads, keeps every stage of the starter and adds MAE and the
    joint-embedding image stage, so that it trains every objective (MLM, MAE, data2vec, CLIP,
    joint), and evaluates every pretrain stage it trains."""
    from pipeline.config import build
    from stages import pretrain as stage

    path = REPO / "recipes" / "learn.yaml"
    recipe, _ = load_recipe(path)
    starter, _ = load_recipe(DEFAULT_RECIPE)
    pre = {s["name"]: s for s in recipe.stages if s.get("stage") == "pretrain"}
    assert {s["name"] for s in starter.stages if s.get("stage") == "pretrain"} < set(pre)
    kinds = {o.get("objective", k) for s in pre.values() for k, o in s["objectives"].items()}
    assert {"mlm", "mae", "data2vec", "clip", "joint"} <= kinds
    for name, s in pre.items():
        build(stage.Config, {k: v for k, v in s.items() if k not in ("name", "stage")}, f"{path}: {name}")
    evaluate = next(s for s in recipe.stages if s["name"] == "evaluate")
    assert sorted(e.removeprefix("{run}/") for e in evaluate["encoders"]) == sorted(pre)


def test_starter_recipe_runs_end_to_end_with_short_stages(tmp_path):
    """Every stage of the starter recipe, in order and chained (the image-text CLIP stage starts
    from data2vec's image encoder), shortened to a few steps."""
    recipe, _ = load_recipe(DEFAULT_RECIPE)
    pretrain = [s["name"] for s in recipe.stages if s.get("stage") == "pretrain"]
    assert {"data2vec_image", "mlm_joint_text", "clip_image_text", "clip_audio_text"} <= set(pretrain)
    short = [f"stages.{n}.{k}={v}" for n in pretrain for k, v in (("steps", 2), ("loader.batch_size", 4),
                                                                   ("loader.num_workers", 0))]
    small = ["stages.evaluate.max_test=32", "stages.evaluate.max_train=64", "stages.tokenize.vocab_size=1000"]
    run = run_recipe(DEFAULT_RECIPE, ["stages.validate.full=false", *short, *small], runs=tmp_path, progress=False)
    for name in pretrain:
        done = json.loads((run / name / "done.json").read_text())
        assert done["summary"]["step"] == 2, name
        assert (run / name / "encoders").is_dir() and (run / name / "checkpoints" / "step_00000002").is_dir()
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(run / "clip_image_text" / "encoders" / "image")
    AutoTokenizer.from_pretrained(run / "clip_audio_text" / "encoders" / "text")
    parity = json.loads((run / "export" / "parity.json").read_text())["max_abs_diff"]
    assert {"image", "text", "audio", "clip_image_text", "clip_audio_text"} <= set(parity)
    assert all(v <= 1e-5 for d in parity.values() for v in d.values()), parity
    report = json.loads((run / "evaluate" / "report.json").read_text())
    tasks = {e["task"] for e in report["entries"]}
    assert {"knn", "linear_probe", "zero_shot", "retrieval"} <= tasks, tasks
    assert all(set(e["baselines"]) >= {"random_init", "raw_input", "chance"} for e in report["entries"])
    assert (run / "evaluate" / "report.html").is_file()
    index = json.loads((run / "index" / "index.json").read_text())
    assert index, "the index stage wrote no index.json"


@pytest.mark.parametrize("name", ["..", "../../../victim", "a/b", "/abs", "."])
def test_a_stage_or_run_name_that_would_leave_its_parent_is_refused_before_anything_is_touched(tmp_path, name):
    recipe = setup(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for field in ("stage", "run"):
        bad = dict(data, stages=[dict(data["stages"][0], name=name, stage="validate")]) if field == "stage" \
            else dict(data, name=name)
        recipe.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match="is not a plain name"):
            run_recipe(recipe, runs=tmp_path / "runs" / "deep" / "er", progress=False)
    assert (victim / "keep.txt").read_text() == "precious" and not (tmp_path / "runs").exists()


def test_a_changed_stage_with_checkpoints_is_kept_aside_not_wiped(tmp_path, caplog):
    recipe = setup(tmp_path)
    run = run_recipe(recipe, runs=tmp_path / "runs", progress=False)
    (run / "tokenize" / "checkpoints").mkdir()
    (run / "tokenize" / "checkpoints" / "w").write_text("hours of training")
    old = json.loads((run / "tokenize" / "stage.json").read_text())["hash"][:12]
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        run_recipe(recipe, ["stages.tokenize.vocab_size=80"], runs=tmp_path / "runs", progress=False)
    aside = run / f"tokenize.{old}"
    assert (aside / "checkpoints" / "w").read_text() == "hours of training"
    assert f"kept in {aside}" in caplog.text and (run / "tokenize" / "done.json").is_file()
