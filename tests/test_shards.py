"""Shard stage: every input kind and every modality survives raw item → shard → loader batch, and
the manifest's counts, keys and sha256s describe the files written."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import STARTER, image_shards, png

from pipeline.cli import main
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
from pipeline.data.shards import iter_samples, open_shards, sha256_file
from pipeline.stage import Context
from stages.tokenize import Config as TokenizeConfig
from stages.tokenize import run as train_tokenizer

WORDS = ["red apple", "blue moon over the sea", "green tree", "a small dog runs", "the cat sleeps", "fire"]


def flac(seed: int, seconds: float = 0.5, sr: int = 8000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The webdataset / img2dataset folder layout: a.png + a.txt + a.cls + a.flac is one item."""
    root = tmp_path / "raw"
    root.mkdir()
    for i, text in enumerate(WORDS):
        (root / f"item{i}.png").write_bytes(png(i))
        (root / f"item{i}.txt").write_text(text)
        (root / f"item{i}.cls").write_text(str(i % 3))
        (root / f"item{i}.flac").write_bytes(flac(i))
    return root


def shard(input_path: Path, out: Path, *extra: str) -> dict:
    assert main(["shard", str(input_path), "--out", str(out), "--max-count", "4", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def tokenizer(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tok"
    train_tokenizer(TokenizeConfig(shards=[str(shards)], vocab_size=200, min_frequency=1),
                    Context(out_dir=out, progress=False))
    return out


def check_manifest(out: Path, manifest: dict, n: int, keys: set[str]) -> None:
    assert manifest["total"] == n == sum(s["count"] for s in manifest["shards"])
    for entry in manifest["shards"]:
        path = out / entry["path"]
        assert entry["sha256"] == sha256_file(path)
        samples = list(iter_samples(str(path)))
        assert len(samples) == entry["count"]
        assert set(entry["keys"]) == keys == {k for s in samples for k in s if not k.startswith("__")}


def test_folder_round_trip_every_modality(folder, tmp_path):
    out = tmp_path / "shards"
    manifest = shard(folder, out)
    check_manifest(out, manifest, len(WORDS), {"png", "txt", "cls", "flac"})
    first = next(iter_samples(str(out / manifest["shards"][0]["path"])))
    assert first["__key__"] == "item0" and first["png"] == (folder / "item0.png").read_bytes()
    assert first["flac"] == (folder / "item0.flac").read_bytes() and first["txt"] == b"red apple"

    modality_cfgs = {"image": {"size": 8}, "text": {"tokenizer": str(tokenizer(out, tmp_path))},
                     "audio": {"sample_rate": 8000, "clip_seconds": 0.25, "n_mels": 16, "n_fft": 128, "hop_length": 64}}
    from pipeline import registry

    cfgs = {m: registry.modality(m).Config(**c) for m, c in modality_cfgs.items()}
    loader = StreamingLoader({"all": SourceConfig(shards=str(out), modalities=["image", "text", "audio"], label="cls")},
                             LoaderConfig(batch_size=len(WORDS), num_workers=0, epochs=1, augment=False), cfgs)
    (batch,) = list(loader)
    order = [int(k.removeprefix("item")) for k in batch["__key__"]]
    assert sorted(order) == list(range(len(WORDS)))
    assert batch["image"].shape == (len(WORDS), 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["audio"].shape == (len(WORDS), 1, 16, 0.25 * 8000 // 64 + 1)
    assert batch["cls"].tolist() == [i % 3 for i in order]
    ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"]
    tok = loader_tokenizer(cfgs["text"])
    for row, i in enumerate(order):
        n = int(mask[row].sum())
        assert tok.decode(ids[row, :n], skip_special_tokens=True) == WORDS[i]
        assert (mask[row, n:] == 0).all()


def loader_tokenizer(cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer)


def test_jsonl_and_hf_dataset_inputs(folder, tmp_path):
    lines = [{"id": f"r{i}", "image": f"raw/item{i}.png", "caption": WORDS[i], "label": i % 3} for i in range(len(WORDS))]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "from_jsonl"
    manifest = shard(jsonl, out, "--key-field", "id")
    check_manifest(out, manifest, len(WORDS), {"png", "txt", "cls"})
    sample = next(iter_samples(str(out / manifest["shards"][0]["path"])))
    assert sample["__key__"] == "r0" and sample["png"] == png(0) and sample["cls"] == b"0"

    import datasets

    ds = datasets.Dataset.from_dict({"image": [str(folder / f"item{i}.png") for i in range(len(WORDS))],
                                     "text": WORDS, "label": [i % 3 for i in range(len(WORDS))]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "from_hf"
    manifest = shard(tmp_path / "hf", out)
    check_manifest(out, manifest, len(WORDS), {"png", "txt", "cls"})
    samples = [s for e in manifest["shards"] for s in iter_samples(str(out / e["path"]))]
    assert [s["png"] for s in samples] == [png(i) for i in range(len(WORDS))]  # original bytes, not re-encoded
    assert [s["txt"].decode() for s in samples] == WORDS


def test_reshard_compressed_is_reproducible(tmp_path):
    src = image_shards(tmp_path / "src", n=30, per_shard=7)
    a, b = tmp_path / "a", tmp_path / "b"
    ma = shard(src, a, "--compress", "--workers", "2")
    mb = shard(src, b, "--compress", "--workers", "1")
    check_manifest(a, ma, 30, {"png", "cls", "json"})
    assert [e["path"] for e in ma["shards"]] == [f"shard-{i:06d}.tar.gz" for i in range(8)]
    assert [e["sha256"] for e in ma["shards"]] == [e["sha256"] for e in mb["shards"]]  # byte-identical
    keys = [s["__key__"] for e in ma["shards"] for s in iter_samples(str(a / e["path"]))]
    assert keys == [f"s{i:05d}" for i in range(30)]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_starter_manifests_match_files():
    """The committed starter data is what its manifests say (counts and checksums)."""
    for manifest in sorted(STARTER.glob("*/*/manifest.json")):
        shards = open_shards(manifest.parent)
        entries = json.loads(manifest.read_text())["shards"]
        assert len(shards) == len(entries) > 0
        for entry in entries:
            assert sha256_file(manifest.parent / entry["path"]) == entry["sha256"], entry["path"]


def test_reader_gives_the_same_samples_as_tarfile_plain_and_gzip(tmp_path):
    import tarfile

    plain = image_shards(tmp_path / "plain", n=12, per_shard=12) / "shard-000000.tar"
    packed = image_shards(tmp_path / "gz", n=12, per_shard=12, compress=True) / "shard-000000.tar.gz"
    with tarfile.open(plain) as tf:
        expected = [(m.name, tf.extractfile(m).read()) for m in tf]
    for path in (plain, packed):
        samples = list(iter_samples(str(path)))
        assert [(f"{s['__key__']}.{ext}", s[ext]) for s in samples for ext in ("cls", "json", "png")] == expected
        assert list(iter_samples(str(path), 3, 7)) == samples[3:7]
        # members nobody asked for are stepped over, yet still listed
        wanted = list(iter_samples(str(path), 2, 5, exts={"png"}))
        assert [s["png"] for s in wanted] == [s["png"] for s in samples[2:5]]
        assert all(s["cls"] is None and s["json"] is None for s in wanted)


def test_reader_rejects_a_corrupt_header_naming_the_shard(tmp_path):
    from pipeline.data.shards import ShardError

    path = image_shards(tmp_path / "s", n=4, per_shard=4) / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[1024 + 10] ^= 0x55  # in the name of the second member (after a one-block label): checksum broken
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: unreadable tar after sample 's00000'.*checksum"):
        list(iter_samples(str(path)))


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_reader_long_names_and_concatenated_gzip(tmp_path, fmt):
    import gzip
    import tarfile

    names = [f"{'d' * 120}/k{i}.{ext}" for i in range(3) for ext in ("cls", "txt")]
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT if fmt == "gnu" else tarfile.PAX_FORMAT) as tf:
        for n, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = n
            tf.addfile(info, io.BytesIO(bytes(range(n))))
    data = path.read_bytes()
    packed = tmp_path / "long.tar.gz"
    packed.write_bytes(gzip.compress(data[:2048]) + gzip.compress(data[2048:]))  # two gzip members
    for p in (path, packed):
        samples = list(iter_samples(str(p)))
        assert [s["__key__"] for s in samples] == [f"{'d' * 120}/k{i}" for i in range(3)]
        assert [s[ext] for s in samples for ext in ("cls", "txt")] == [bytes(range(n)) for n in range(6)]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_failed_reshard_leaves_the_previous_shards_as_they_were(tmp_path):
    from pipeline.data.writer import write_shards

    out = image_shards(tmp_path / "out", n=30, per_shard=4)
    before = _files(out)

    def to_sample(i):
        if i == 25:
            raise RuntimeError("disk full")
        return {"__key__": f"n{i:05d}", "txt": b"new"}

    with pytest.raises(RuntimeError, match="disk full"):
        write_shards(list(range(30)), to_sample, out, max_count=4, workers=1, progress=False)
    assert _files(out) == before and [p.name for p in out.iterdir() if p.is_dir()] == []


def test_reshard_onto_itself_keeps_every_sample(tmp_path):
    src = image_shards(tmp_path / "set", n=30, per_shard=7)
    want = [s for e in json.loads((src / "manifest.json").read_text())["shards"] for s in iter_samples(str(src / e["path"]))]
    manifest = shard(src, src)
    assert manifest["total"] == 30 and [e["path"] for e in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(8)]
    got = [s for e in manifest["shards"] for s in iter_samples(str(src / e["path"]))]
    assert [{k: v for k, v in s.items() if k != "__index__"} for s in got] == \
        [{k: v for k, v in s.items() if k != "__index__"} for s in want]
    assert sorted(p.name for p in src.glob("*.tar")) == [e["path"] for e in manifest["shards"]]
    assert not list(src.glob(".building-*"))


@pytest.mark.parametrize("prefix", ["../elsewhere/train", "/tmp/abs", "a/b", ".."])
def test_prefix_may_not_leave_out(folder, tmp_path, capsys, prefix):
    out = tmp_path / "o" / "out"
    assert main(["shard", str(folder), "--out", str(out), "--prefix", prefix]) == 2
    err = capsys.readouterr().err
    assert "prefix" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "elsewhere").exists()
