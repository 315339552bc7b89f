"""Inputs of the shard stage (``pipeline.data.sources``): every bad input is one line naming the
file (and line) and the key or field; nothing is written outside its place."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from conftest import png

from pipeline.cli import main
from pipeline.data.shards import iter_samples


def jsonl(tmp_path: Path, rows: list[dict], name: str = "items.jsonl") -> Path:
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_shard(capsys, *args: str) -> tuple[int, str]:
    code = main(["shard", *map(str, args)])
    err = capsys.readouterr().err  # the progress bar shares stderr, on lines of its own
    return code, "\n".join(ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("selfsup"))


def one_line(err: str) -> str:
    assert len(err.splitlines()) == 1, err
    return err


def test_repeated_keys_are_an_error_naming_file_lines_and_key(tmp_path, capsys):
    rows = [{"id": "a", "caption": "x"}, {"id": "b", "caption": "y"}, {"id": "a", "caption": "z"}]
    path = jsonl(tmp_path, rows)
    code, err = run_shard(capsys, path, "--out", tmp_path / "out", "--key-field", "id")
    assert code == 2
    assert f"key 'a' is used by 2 items: {path}:1, {path}:3" in one_line(err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_repeated_keys_skipped_and_counted_when_asked(tmp_path, capsys):
    rows = [{"id": "a", "caption": "x"}, {"id": "b", "caption": "y"}, {"id": "a", "caption": "z"}]
    out = tmp_path / "out"
    code, _ = run_shard(capsys, jsonl(tmp_path, rows), "--out", out, "--key-field", "id", "--duplicates", "skip")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    samples = [s for e in manifest["shards"] for s in iter_samples(str(out / e["path"]))]
    assert manifest["total"] == 2 and [(s["__key__"], s["txt"]) for s in samples] == [("a", b"x"), ("b", b"y")]
    assert json.loads((out / "done.json").read_text())["summary"]["skipped_duplicates"] == 1


@pytest.mark.parametrize("key", ["/abs/key", "a\\b", "dir/"])
def test_keys_that_would_leave_the_shard_are_refused(tmp_path, capsys, key):
    path = jsonl(tmp_path, [{"id": key, "caption": "x"}])
    code, err = run_shard(capsys, path, "--out", tmp_path / "out", "--key-field", "id")
    assert code == 2 and f"{path}:1" in one_line(err) and "tar member names must stay inside the shard" in err


def test_field_names_that_would_leave_the_shard_are_refused(tmp_path, capsys):
    path = jsonl(tmp_path, [{"../x": "payload", "caption": "x"}])
    code, err = run_shard(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and "field '../x' cannot be a tar member suffix" in one_line(err)


def test_writer_checks_member_names_whatever_makes_the_samples(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.data.writer import write_shards

    with pytest.raises(ConfigError, match=r"sample key '\.\./up' holds a '\.\.' component"):
        write_shards([0], lambda i: {"__key__": "../up", "txt": b"x"}, tmp_path / "out", workers=1, progress=False)
    write_shards([0], lambda i: {"__key__": "sub/k", "txt": b"x"}, tmp_path / "ok", workers=1, progress=False)
    with tarfile.open(tmp_path / "ok" / "shard-000000.tar") as tf:
        assert tf.getnames() == ["sub/k.txt"]


def test_jsonl_media_may_not_leave_its_folder_unless_allowed(tmp_path, capsys):
    (tmp_path / "secret.png").write_bytes(png(0))
    path = jsonl(tmp_path, [{"image": "../secret.png"}])
    code, err = run_shard(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and f"{path}:1: field 'image': '../secret.png' holds a '..' component" in one_line(err)
    code, _ = run_shard(capsys, path, "--out", tmp_path / "out", "--allow-outside")
    assert code == 0


def test_jsonl_naming_a_missing_file(tmp_path, capsys):
    path = jsonl(tmp_path, [{"image": "gone.png"}])
    code, err = run_shard(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and one_line(err).endswith(f"{path}:1: field 'image': {path.parent / 'gone.png'}: no such file")


@pytest.mark.parametrize("label", ["cat", 2.5, [1]])
def test_non_integer_label(tmp_path, capsys, label):
    path = jsonl(tmp_path, [{"caption": "a", "label": 1}, {"caption": "b", "label": label}])
    code, err = run_shard(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and one_line(err).endswith(f"{path}:2: field 'label': label {label!r} is not an integer")


def test_folder_that_is_not_a_datasets_directory(tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    code, err = run_shard(capsys, folder, "--out", tmp_path / "out", "--format", "hf")
    assert code == 2 and f"{folder}: not a saved datasets directory" in one_line(err)
