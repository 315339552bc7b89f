"""``pipeline.data.paths.inside``: a path derived from a name stays inside its parent."""

from __future__ import annotations

import json

import pytest
from conftest import image_shards

from pipeline.config import ConfigError
from pipeline.data.paths import inside


@pytest.mark.parametrize("name", ["a", "a/b.tar", "sub/./x", "..a", "a..b"])
def test_names_that_stay_inside(tmp_path, name):
    assert inside(tmp_path, name, "stage") == tmp_path / name


@pytest.mark.parametrize("name, why", [("..", "'..' component"), ("../victim", "'..' component"),
                                       ("a/../../b", "'..' component"), ("/etc", "absolute path"),
                                       ("a\\b", "backslash"), ("", "is empty"), ("a\0b", "NUL")])
def test_names_that_would_leave_are_one_line_errors(tmp_path, name, why):
    with pytest.raises(ConfigError, match=f"^stage name: .*{why}.*; it must stay inside {tmp_path}$"):
        inside(tmp_path, name, "stage name")


def test_manifest_entries_may_not_leave_the_manifest_folder(tmp_path):
    from pipeline.data.shards import open_shards

    shards = image_shards(tmp_path / "s", n=10, per_shard=10)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["path"] = "../elsewhere.tar"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"manifest\.json: shard: '\.\./elsewhere\.tar' holds a '\.\.' component"):
        open_shards(shards)
