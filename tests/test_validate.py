"""``selfsup validate``: each kind of broken shard is reported with its shard file and sample key."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from pipeline.cli import main
from pipeline.data.writer import write_shards
from pipeline.stage import Context
from stages import validate


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _flac() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1600, np.float32), 16000, format="FLAC")
    return buf.getvalue()


PNG, FLAC = _png(), _flac()


def good(i: int) -> dict:
    return {"__key__": f"k{i}", "png": PNG, "flac": FLAC, "txt": f"sample {i}".encode(), "cls": str(i % 3).encode(),
            "json": json.dumps({"i": i}).encode()}


def make(tmp_path: Path, n: int = 12, edit=None, max_count: int = 4) -> Path:
    """``n`` samples in shards of ``max_count``; ``edit(i, sample)`` spoils some of them."""
    out = tmp_path / "shards"

    def to_sample(i):
        sample = good(i)
        return edit(i, sample) or sample if edit else sample

    write_shards(list(range(n)), to_sample, out, max_count=max_count, compress=False, workers=1, progress=False)
    return out


def check(shards: Path, tmp_path: Path, **settings) -> dict:
    cfg = validate.Config(shards=[str(shards)], **{"jobs": 1, **settings})
    ctx = Context(out_dir=tmp_path / "out", progress=False)
    ctx.out_dir.mkdir(exist_ok=True)
    return validate.run(cfg, ctx)


def one_error(summary: dict) -> str:
    assert summary["status"] == "failed", summary
    assert summary["n_errors"] == 1, summary["errors"]
    return summary["errors"][0]


def test_clean_set_passes(tmp_path):
    summary = check(make(tmp_path), tmp_path, full=True, require=["png", "cls"])
    assert summary["status"] == "ok" and summary["errors"] == [] and summary["n_errors"] == 0
    assert summary["shards"] == 3 and summary["samples"] == 12
    assert json.loads((tmp_path / "out" / "report.json").read_text())["status"] == "ok"


def test_truncated_tar(tmp_path):
    shards = make(tmp_path)
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])
    errors = check(shards, tmp_path)["errors"]
    assert any("shard-000001.tar" in e and "unreadable tar after sample 'k" in e for e in errors), errors
    assert any("shard-000001.tar" in e and "the manifest promises 4" in e for e in errors), errors


@pytest.mark.parametrize("ext, value, phrase", [
    ("png", b"garbage, not a png", "png: cannot decode png"),
    ("flac", b"", "flac: empty flac (0 bytes)"),
    ("txt", b"\xff\xfe bad", "txt: txt is not UTF-8"),
    ("cls", b"cat", "cls: not an integer"),
    ("json", b"{oops", "json: Expecting property name"),
])
def test_bad_value_names_shard_and_key(tmp_path, ext, value, phrase):
    shards = make(tmp_path, edit=lambda i, s: s.update({ext: value}) if i == 5 else None)
    line = one_error(check(shards, tmp_path))
    assert line.startswith(f"{shards / 'shard-000001.tar'}: sample 'k5': {phrase}"), line


def test_missing_required_key(tmp_path):
    shards = make(tmp_path, edit=lambda i, s: s.pop("cls") and None if i == 9 else None)
    line = one_error(check(shards, tmp_path, require=["jpg|png", "cls"]))
    assert "shard-000002.tar: sample 'k9': missing required key 'cls' (has flac, json, png, txt)" in line
    assert check(shards, tmp_path, require=["jpg|webp"])["errors"][0].endswith(
        "missing required key 'one of jpg, webp' (has cls, flac, json, png, txt)")


def test_manifest_sha256_and_count_mismatch(tmp_path):
    shards = make(tmp_path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    manifest["shards"][2]["count"] = 5
    (shards / "manifest.json").write_text(json.dumps(manifest))
    errors = check(shards, tmp_path)["errors"]
    assert len(errors) == 2
    assert "shard-000000.tar: sha256" in errors[0] and "differs from the manifest" in errors[0]
    assert errors[1].endswith("shard-000002.tar: holds 4 samples, the manifest promises 5")


def test_sampled_decoding_skips_the_middle_unless_full(tmp_path):
    shards = make(tmp_path, n=64, max_count=64, edit=lambda i, s: s.update(png=b"bad") if i == 41 else None)
    assert check(shards, tmp_path)["status"] == "ok"
    assert "sample 'k41'" in one_error(check(shards, tmp_path, full=True))
    plan = validate.Plan([], False, {}, 50)
    assert sum(plan.decoded(i, 64) for i in range(64)) == 16 + 6  # 6 spread samples fall past the head


def test_errors_are_counted_past_max_errors(tmp_path):
    shards = make(tmp_path, edit=lambda i, s: s.update(txt=b"\xff"))
    summary = check(shards, tmp_path, max_errors=3)
    assert summary["n_errors"] == 12 and len(summary["errors"]) == 3


def test_warns_when_fewer_shards_than_streams(tmp_path):
    shards = make(tmp_path, edit=lambda i, s: s.update(npy=b"x"))
    summary = check(shards, tmp_path, processes=2, workers=2)
    assert summary["status"] == "ok"
    assert any("3 shards for 2 processes × 2 workers = 4 streams" in w for w in summary["warnings"])
    assert any("not checked" in w and "npy" in w for w in summary["warnings"])
    assert not any("streams" in w for w in check(shards, tmp_path, processes=1, workers=2)["warnings"])


def test_parallel_check_matches_serial(tmp_path):
    shards = make(tmp_path, edit=lambda i, s: s.update(png=b"bad") if i in (2, 7) else None)
    serial, parallel = check(shards, tmp_path, jobs=1), check(shards, tmp_path, jobs=2)
    assert parallel["errors"] == serial["errors"] and parallel["samples"] == serial["samples"] == 12


def test_cli_exit_status(tmp_path, capsys):
    shards = make(tmp_path, edit=lambda i, s: s.update(flac=b"") if i == 1 else None)
    out = str(tmp_path / "cli")
    assert main(["validate", str(shards), "--full", "--out", out]) == 1
    assert "sample 'k1': flac: empty flac" in capsys.readouterr().out
    good_set = make(tmp_path / "good")
    assert main(["validate", str(good_set / "shard-00000{0..2}.tar"), "--require", "png,cls", "--out", out]) == 0
    assert main(["validate", str(good_set / "*.tar"), "--require", "png,wav", "--out", out]) == 1


def test_shard_errors_are_listed_before_sample_errors(tmp_path):
    shards = make(tmp_path, edit=lambda i, s: s.pop("cls") and None)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][2]["sha256"] = "0" * 64
    (shards / "manifest.json").write_text(json.dumps(manifest))
    summary = check(shards, tmp_path, require=["cls"], max_errors=2)
    assert summary["n_errors"] == 13 and "shard-000002.tar: sha256" in summary["errors"][0]


def test_specs_resolve_alike_for_validate_and_the_loader(tmp_path):
    """One resolver: a folder with neither manifest nor tars is the same one-line error for both."""
    from pipeline.config import ConfigError
    from pipeline.data.shards import open_shards

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="folder holds neither manifest.json nor tar files") as loader_error:
        open_shards(empty)
    with pytest.raises(ConfigError) as validate_error:
        check(empty, tmp_path)
    assert str(validate_error.value) == str(loader_error.value)


def test_manifest_naming_a_missing_shard(tmp_path, capsys):
    from pipeline.config import ConfigError
    from pipeline.data.shards import open_shards

    shards = make(tmp_path)
    (shards / "shard-000001.tar").unlink()
    line = one_error(check(shards, tmp_path))
    assert line == f"{shards / 'shard-000001.tar'}: no such file, though the manifest lists it"
    with pytest.raises(ConfigError, match=r"manifest\.json: lists shard shard-000001\.tar, which does not exist"):
        open_shards(shards)


def test_link_members_are_reported_not_skipped(tmp_path):
    import tarfile

    shards = make(tmp_path, n=4)
    tar = shards / "shard-000000.tar"
    with tarfile.open(tar, "a") as tf:  # append a symlink and a hard link after the samples
        for kind, name in ((tarfile.SYMTYPE, "k9.png"), (tarfile.LNKTYPE, "k9.txt")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=None, count=4)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    errors = check(shards, tmp_path)["errors"]
    assert [e for e in errors if "link" in e] == [
        f"{tar}: sample 'k9': member 'k9.png' is a symbolic link, which readers skip (store the file itself in the shard)",
        f"{tar}: sample 'k9': member 'k9.txt' is a hard link, which readers skip (store the file itself in the shard)"]


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG")  # ~100 KB on disk, 100 megapixels decoded
    return buf.getvalue()


def test_decoded_size_limits_are_errors_naming_shard_and_key(tmp_path, recwarn):
    from modalities.audio import AudioConfig
    from modalities.audio import Modality as Audio

    huge = _huge_png()
    shards = make(tmp_path, edit=lambda i, s: s.update(png=huge) if i == 2 else None)
    assert one_error(check(shards, tmp_path, full=True)) == (
        f"{shards / 'shard-000000.tar'}: sample 'k2': png: png decodes to 10000x10000 = 100.0 megapixels, "
        "over image.max_pixels 64000000 (raise it if such images are meant to be read)")
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]  # an error, not a warning
    long_audio = io.BytesIO()
    sf.write(long_audio, np.zeros(8000 * 20, np.float32), 8000, format="FLAC")
    with pytest.raises(ValueError, match=r"^flac lasts 20\.0 s, over audio\.max_seconds 10$"):
        Audio(AudioConfig(max_seconds=10)).decode(long_audio.getvalue(), "flac")
    assert Audio(AudioConfig()).decode(long_audio.getvalue(), "flac").numel() == 16000 * 20
