"""Config strictness: every user mistake is one line naming the key and the closest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, apply_overrides, parse_value
from pipeline.runner import load_recipe

RECIPE = {
    "name": "t",
    "seed": 0,
    "sources": {"imgs": {"shards": "shards", "modalities": ["image"], "label": "cls"}},
    "modalities": {"image": {"size": 8}},
    "stages": [{"name": "check", "stage": "validate", "shards": ["shards"]},
               {"name": "tokenize", "shards": ["shards"], "vocab_size": 100}],
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, data), list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_valid_recipe_loads(tmp_path):
    recipe, modalities = load_recipe(write(tmp_path, RECIPE))
    assert recipe.sources["imgs"].label == "cls"
    assert modalities["image"].size == 8


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.update(sede=1), "unknown key 'sede' (did you mean 'seed'?)"),
    (lambda r: r["sources"]["imgs"].update(modalitys=["image"]), "'sources.imgs.modalitys' (did you mean 'modalities'?)"),
    (lambda r: r["modalities"]["image"].update(sise=8), "unknown key 'sise' (did you mean 'size'?)"),
    (lambda r: r["stages"][1].update(vocab_sise=10), "unknown key 'vocab_sise' (did you mean 'vocab_size'?)"),
    (lambda r: r["stages"][0].update(stage="validat"), "did you mean 'validate'?"),
    (lambda r: r["modalities"].update(imgae={}), "did you mean 'image'?"),
    (lambda r: r["modalities"]["image"].update(size="big"), "size"),
])
def test_recipe_mistakes_name_the_key(tmp_path, edit, expected):
    import copy

    data = copy.deepcopy(RECIPE)
    edit(data)
    assert expected in error_of(tmp_path, data)


@pytest.mark.parametrize("override, expected", [
    ("sede=3", "unknown key 'sede' (did you mean 'seed'?)"),
    ("stages.tokenize.vocab_sise=10", "did you mean 'vocab_size'?"),
    ("stages.tokenise.vocab_size=10", "no item 'tokenise' (did you mean 'tokenize'?)"),
    ("seed", "expected key=value"),
])
def test_override_mistakes_name_the_key(tmp_path, override, expected):
    assert expected in error_of(tmp_path, RECIPE, [override])


def test_overrides_type_values_and_address_stages_by_name(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, RECIPE), ["seed=7", "stages.tokenize.vocab_size=300",
                                                      "modalities.image.crop_scale=[0.5, 1.0]"])
    assert recipe.seed == 7
    assert recipe.stages[1]["vocab_size"] == 300
    assert parse_value("1e-3") == 0.001 and parse_value("[a, b]") == ["a", "b"] and parse_value("x") == "x"
    assert apply_overrides({"a": [{"name": "x", "v": 1}]}, ["a.x.v=2"]) == {"a": [{"name": "x", "v": 2}]}


def test_cli_reports_mistakes_in_one_line(tmp_path, capsys):
    path = write(tmp_path, RECIPE)
    assert main(["run", str(path), "sede=1", "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfsup: error:") and "did you mean 'seed'?" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["validate", str(tmp_path), "--fulll"])
    assert e.value.code == 2
    assert "did you mean --full?" in capsys.readouterr().err


@pytest.mark.parametrize("component, key, value", [
    ("loader", "batch_size", 0), ("loader", "batch_size", -3), ("loader", "interleave", 0),
    ("loader", "num_workers", -1), ("loader", "epochs", 0), ("loader", "prefetch_factor", 0),
    ("source", "weight", 0), ("shard", "max_count", 0), ("shard", "max_size", 0), ("shard", "workers", 0),
    ("validate", "processes", 0), ("validate", "workers", -1), ("validate", "jobs", 0), ("validate", "max_errors", -1),
])
def test_numeric_settings_out_of_range_name_the_key(component, key, value):
    from pipeline.config import build
    from pipeline.data.loader import LoaderConfig, SourceConfig
    from stages import shard, validate

    cls, base = {"loader": (LoaderConfig, {}), "source": (SourceConfig, {"shards": "s", "modalities": ["image"]}),
                 "shard": (shard.Config, {"input": "x"}), "validate": (validate.Config, {"shards": ["s"]})}[component]
    with pytest.raises(ConfigError, match=rf"^{component}: {key}: Input should be greater than") as e:
        build(cls, {**base, key: value}, component)
    assert "\n" not in str(e.value)
