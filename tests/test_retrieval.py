"""The retrieval index and ``selfsup retrieve``: exact search against brute force and faiss, an index
built by the index stage from a real (tiny) CLIP stage on the starter emoji shards, whose samples
retrieve themselves, the CLIP loader on both layouts, and the command's JSON against its schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STARTER

from pipeline.config import ConfigError
from pipeline.retrieval.index import Index, exact_search, write

EMOJI = STARTER / "emoji" / "test"
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_index(path: Path, n: int = 3000, dim: int = 24) -> tuple[Path, np.ndarray]:
    x = _unit(n, dim, 0)
    where = [(f"shard-{i // 1000}.tar", i % 1000) for i in range(n)]
    write(path, {"image": x}, {"image": [f"k{i}" for i in range(n)]}, {"image": where}, {"encoders": "-"})
    return path, x


def test_exact_search_is_brute_force_over_chunks_and_keeps_places(tmp_path):
    path, x = _random_index(tmp_path / "ix")
    index = Index(path, chunk=700)  # several chunks and a ragged last one
    q = _unit(9, 24, 1)
    hits = index.search(q, "image", 7)
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    assert (hits.rows == brute).all()
    assert np.allclose(hits.scores, np.take_along_axis(q @ x.T, brute, 1), atol=1e-6)
    own = index.search(x[[5, 1500, 2999]], "image", 1)  # a stored vector finds itself, at cosine 1
    assert own.rows[:, 0].tolist() == [5, 1500, 2999] and np.allclose(own.scores, 1, atol=1e-5)
    assert index.place("image", 2999) == ("shard-2.tar", 999) and index.keys("image")[2999] == "k2999"
    assert exact_search(q, x[:3], 10).rows.shape == (9, 3)  # k beyond the index: all rows
    with pytest.raises(ConfigError, match="no text in this index"):
        index.search(q, "text", 3)


def test_faiss_and_exact_agree(tmp_path):
    pytest.importorskip("faiss")
    path, _ = _random_index(tmp_path / "ix")
    q = _unit(64, 24, 2)
    exact, fast = Index(path).search(q, "image", 10), Index(path, backend="faiss").search(q, "image", 10)
    assert (exact.rows == fast.rows).all()
    assert np.abs(exact.scores - fast.scores).max() < 1e-5


def test_a_missing_index_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not an index"):
        Index(tmp_path)


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory) -> tuple[Path, Path]:
    """(a two-step image–text CLIP stage on the emoji test shards, the index the index stage made of them)."""
    run = _tiny_clip_run(tmp_path_factory.mktemp("clip"), {"image": {**TINY, "patch_size": 8}, "text": TINY},
                         [{"name": "index", "encoders": "{run}/clip", "data": [str(EMOJI)], "batch_size": 32}])
    return run / "clip", run / "index"


def _tiny_clip_run(tmp: Path, encoders: dict, more_stages: list[dict]) -> Path:
    """The run directory of a recipe that tokenizes the emoji test shards, trains a two-step
    image–text CLIP stage (``clip``) on them with ``encoders`` and runs ``more_stages`` after it."""
    import yaml

    from pipeline.runner import run_recipe

    recipe = {
        "name": "tiny", "sources": {"emoji": {"shards": str(EMOJI), "modalities": ["image", "text"]}},
        "modalities": {"image": {"size": 32}, "text": {"tokenizer": "{run}/tokenize", "max_length": 16}},
        "stages": [
            {"name": "tokenize", "shards": [str(EMOJI)], "vocab_size": 300},
            {"name": "clip", "stage": "pretrain", "sources": ["emoji"], "steps": 2, "objectives": {"clip": {}},
             "encoders": encoders, "loader": {"batch_size": 8, "num_workers": 0}},
            *more_stages,
        ],
    }
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    return run_recipe(tmp / "r.yaml", runs=tmp / "runs", progress=False)


def _first_samples(n: int) -> list[dict]:
    from pipeline.data.shards import iter_samples, open_shards

    return list(iter_samples(open_shards(str(EMOJI)).shards[0].path, stop=n))


def test_index_round_trip_a_sample_retrieves_itself(clip_index):
    """The stage's embeddings and the loader's agree: an image read back from its shard, embedded by
    ``load_clip``, finds its own row first, and the row points back at that shard and position."""
    import io

    from PIL import Image

    from pipeline.retrieval.clip import load_clip

    model_dir, path = clip_index
    index = Index(path)
    assert set(index.modalities) == {"image", "text"} and index.info["encoders"] == str(model_dir.resolve())
    matrix = np.asarray(index.matrix("image"))
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)
    clip = load_clip(model_dir)
    samples = _first_samples(4)
    feats = clip.encode_image([Image.open(io.BytesIO(s["png"])) for s in samples]).numpy()
    hits = index.search(feats, "image", 3)
    keys = index.keys("image")
    for s, rows, scores in zip(samples, hits.rows, hits.scores):
        assert keys[rows[0]] == s["__key__"] and scores[0] == pytest.approx(1.0, abs=1e-4)
        shard, position = index.place("image", rows[0])
        assert position == s["__index__"] and Path(shard).name == Path(_first_shard()).name
    text = clip.encode_text([s["txt"].decode() for s in samples]).numpy()
    own = index.search(text, "text", 1)
    assert [index.keys("text")[r] for r in own.rows[:, 0]] == [s["__key__"] for s in samples]


def _first_shard() -> str:
    from pipeline.data.shards import open_shards

    return open_shards(str(EMOJI)).shards[0].path


def test_retrieve_json_follows_its_schema(clip_index, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from pipeline.cli import main
    from pipeline.retrieval.retrieve import SCHEMA

    _, path = clip_index
    (tmp_path / "q.txt").write_text("a red apple\n\nsmiling face\ncat\n")
    assert main(["retrieve", str(path), "--queries", str(tmp_path / "q.txt"), "-k", "3", "--json",
                 "--batch-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    jsonschema.validate(out, json.loads(SCHEMA.read_text()))
    assert [r["query"] for r in out] == ["a red apple", "smiling face", "cat"]
    assert all(len(r["hits"]) == 3 and r["hits"][0]["modality"] == "image" for r in out)
    assert all(h["score"] >= g["score"] for r in out for h, g in zip(r["hits"], r["hits"][1:]))
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject a malformed hit
        jsonschema.validate([{"query": "x", "hits": [{"key": "a", "score": 0.5}]}], json.loads(SCHEMA.read_text()))

    sample = _first_samples(1)[0]
    (tmp_path / "q.png").write_bytes(sample["png"])
    html = tmp_path / "hits.html"
    assert main(["retrieve", str(path), "--image", str(tmp_path / "q.png"), "--target", "image", "-k", "2",
                 "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[1].split()[1] == sample["__key__"]  # by example: itself first
    assert html.read_text().count("<img src='data:image/png;base64,") == 2


@pytest.mark.parametrize("argv, message", [
    (["--image", "nope.png"], "--image nope.png: no such file"),
    (["--audio", "{bad}"], "this CLIP model embeds image and text, not audio"),
    (["x", "--target", "audio"], "no audio in this index"),
    (["--image", "{bad}"], "bad.png"),
    ([], "give one kind of query"),
])
def test_retrieve_errors_are_one_line(clip_index, tmp_path, capsys, argv, message):
    from pipeline.cli import main

    _, path = clip_index
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.flac").write_bytes(b"not a sound")
    argv = [a.replace("{bad}", str(tmp_path / ("bad.png" if "--image" in argv else "bad.flac"))) for a in argv]
    assert main(["retrieve", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_stock_dual_encoder_loads_and_matches_its_own_features(tmp_path):
    """A ``VisionTextDualEncoderModel`` directory with its processor and tokenizer: the loader's
    features are the model's projected features, normalized."""
    from PIL import Image
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    from pipeline.retrieval.clip import load_clip

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nred\napple\ncat\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), model_max_length=16)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32),
        BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16), projection_dim=8)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(cfg).eval()
    out = tmp_path / "dual"
    model.save_pretrained(out)
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    clip = load_clip(out)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    with torch.no_grad():
        want_i = model.get_image_features(pixel_values=proc(images=[image], return_tensors="pt")["pixel_values"])
        ids = tok(["a red apple"], return_tensors="pt")
        want_t = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    want_i = want_i if isinstance(want_i, torch.Tensor) else want_i.pooler_output
    want_t = want_t if isinstance(want_t, torch.Tensor) else want_t.pooler_output
    assert torch.allclose(clip.encode_image([image]), torch.nn.functional.normalize(want_i, dim=-1), atol=1e-6)
    assert torch.allclose(clip.encode_text("a red apple"), torch.nn.functional.normalize(want_t, dim=-1), atol=1e-6)
    with pytest.raises(ConfigError, match="not audio"):
        clip.encode_audio([np.zeros(100)])


def test_audio_text_index_round_trip_and_players(tmp_path, capsys):
    """The audio–text pair: a sound decoded from its shard and embedded by ``encode_audio`` (a raw
    waveform) finds its own row; ``--audio FILE`` searches text by default; the page has players."""
    import yaml

    from pipeline.cli import main
    from pipeline.data.shards import iter_samples, open_shards
    from pipeline.encoders import saved
    from pipeline.retrieval.clip import load_clip
    from pipeline.runner import run_recipe

    speech = STARTER / "speech" / "test"
    recipe = {
        "name": "tiny", "sources": {"speech": {"shards": str(speech), "modalities": ["audio", "text"]}},
        "modalities": {"audio": {"n_mels": 32, "clip_seconds": 0.5},
                       "text": {"tokenizer": "{run}/tokenize", "max_length": 16}},
        "stages": [
            {"name": "tokenize", "shards": [str(speech)], "vocab_size": 300},
            {"name": "clip", "stage": "pretrain", "sources": ["speech"], "steps": 2,
             "objectives": {"clip": {"modalities": ["audio", "text"]}},
             "encoders": {"audio": {**TINY, "patch_size": 8}, "text": TINY},
             "loader": {"batch_size": 8, "num_workers": 0}},
            {"name": "index", "encoders": "{run}/clip", "data": [str(speech)], "batch_size": 32},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = run_recipe(tmp_path / "r.yaml", runs=tmp_path / "runs", progress=False)
    index = Index(run / "index")
    assert set(index.modalities) == {"audio", "text"}
    clip = load_clip(run / "clip")
    samples = list(iter_samples(open_shards(str(speech)).shards[0].path, stop=3))
    mod, _ = saved.load(run / "clip" / "encoders" / "audio")
    ext = next(e for e in mod.extensions if e in samples[0])
    waves = [mod.decode(s[ext], ext).numpy() for s in samples]
    hits = index.search(clip.encode_audio(waves).numpy(), "audio", 1)
    assert [index.keys("audio")[r] for r in hits.rows[:, 0]] == [s["__key__"] for s in samples]

    (tmp_path / f"q.{ext}").write_bytes(samples[0][ext])
    html = tmp_path / "hits.html"
    assert main(["retrieve", str(run / "index"), "--audio", str(tmp_path / f"q.{ext}"), "-k", "2", "--json"]) == 0
    assert [h["modality"] for h in json.loads(capsys.readouterr().out)[0]["hits"]] == ["text", "text"]
    assert main(["retrieve", str(run / "index"), "hello", "-k", "2", "--html", str(html)]) == 0
    assert html.read_text().count("<audio controls src='data:audio/") == 2


def test_an_index_of_the_exported_dual_encoder_agrees_with_the_stage_one(tmp_path, capsys):
    """An image–text CLIP stage and its export as a stock ``VisionTextDualEncoderModel``
    (``export/clip/``) index the same shards to the same rows, and ``retrieve`` on either index finds
    the same hits at the same scores: the stock model with its saved processor and tokenizer
    computes the stage's features, long texts cut where training cut them included."""
    from pipeline.cli import main

    cls = {**TINY, "pooling": "cls"}  # what the stock dual encoder projects
    run = _tiny_clip_run(tmp_path, {"image": {**cls, "patch_size": 8}, "text": cls}, [
        {"name": "export", "stages": ["clip"], "data": [{"shards": str(EMOJI), "modalities": ["image", "text"]}]},
        {"name": "index_stage", "stage": "index", "encoders": "{run}/clip", "data": [str(EMOJI)], "batch_size": 32},
        {"name": "index_export", "stage": "index", "encoders": "{run}/export/clip", "data": [str(EMOJI)],
         "batch_size": 32}])
    stage, export = Index(run / "index_stage"), Index(run / "index_export")
    assert export.info["encoders"] == str((run / "export" / "clip").resolve())
    for m in ("image", "text"):
        assert export.keys(m) == stage.keys(m)
        assert [export.place(m, r) for r in range(3)] == [stage.place(m, r) for r in range(3)]
        assert np.abs(np.asarray(export.matrix(m)) - np.asarray(stage.matrix(m))).max() <= 1e-5

    long = "a grinning face with big eyes beside a red apple on a wooden table under the light of a sunny morning"
    (tmp_path / "q.txt").write_text(f"a red apple\nsmiling cat\n{long}\n")
    (tmp_path / "q.png").write_bytes(_first_samples(1)[0]["png"])
    for query in (["--queries", str(tmp_path / "q.txt")], ["--image", str(tmp_path / "q.png")]):
        hits = []
        for index in (stage, export):
            assert main(["retrieve", str(index.path), *query, "-k", "5", "--json"]) == 0
            hits.append([h for r in json.loads(capsys.readouterr().out) for h in r["hits"]])
        assert [h["key"] for h in hits[1]] == [h["key"] for h in hits[0]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(*hits)) <= 1e-5
