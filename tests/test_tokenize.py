"""``selfsup tokenize``: the saved tokenizer loads with AutoTokenizer and feeds ``modalities.text``."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from modalities.text import Modality as Text
from modalities.text import TextConfig
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.data.writer import write_shards
from pipeline.stage import Context
from stages import tokenize

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds",
         "sing", "in", "green", "trees"]


def sentence(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "shards"
    to_sample = lambda i: {"__key__": f"s{i}", "txt": sentence(i).encode(), "cls": b"0"}
    write_shards(list(range(200)), to_sample, out, max_count=80, compress=False, workers=1, progress=False)
    return out


def train(shards, out, **settings) -> dict:
    ctx = Context(out_dir=out, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    return tokenize.run(tokenize.Config(shards=[str(shards)], **settings), ctx)


@pytest.mark.parametrize("kind, first, last, mask", [("wordpiece", "[CLS]", "[SEP]", "[MASK]"),
                                                     ("bpe", "<s>", "</s>", "<mask>")])
def test_trained_tokenizer_round_trips(shards, tmp_path, kind, first, last, mask):
    summary = train(shards, tmp_path / kind, kind=kind, vocab_size=300, min_frequency=1)
    assert summary["samples"] == 200 and 0 < summary["vocab_size"] <= 300
    tok = AutoTokenizer.from_pretrained(tmp_path / kind)
    ids = tok("Hello world, the quick fox")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == first and tokens[-1] == last and len(tokens) > 3
    assert tok.mask_token == mask and tok.mask_token_id is not None and tok.pad_token_id is not None
    assert tok.model_max_length == 512
    assert "quick fox" in tok.decode(ids, skip_special_tokens=True)

    text = Text(TextConfig(tokenizer=str(tmp_path / kind), max_length=16))
    x = text.transform(" ".join([sentence(1)] * 5), None)
    assert len(x) == 16 and x[0] == tok.convert_tokens_to_ids(first) and x[-1] == tok.convert_tokens_to_ids(last)
    assert tok.unk_token_id not in x.tolist()


def test_wordpiece_ids_are_the_same_in_every_run(shards, tmp_path):
    """The trainer numbers its alphabet in hash-map order, different in every training; the saved
    vocabulary is renumbered in a fixed order, and tokenizes as trained."""

    files = []
    for run in range(3):
        train(shards, tmp_path / str(run), vocab_size=10, min_frequency=1)  # the alphabet alone: no merge
        files.append((tmp_path / str(run) / "tokenizer.json").read_bytes())
    assert files[0] == files[1] == files[2]

    trained = tokenize.build("wordpiece", lowercase=True)
    trained.train_from_iterator([sentence(i) for i in range(200)], tokenize._trainer(
        tokenize.Config(shards=[str(shards)], vocab_size=120, min_frequency=1)))
    texts = [sentence(i) for i in range(200, 220)] + ["Unseen words: zebra, quixotic."]
    tokens = [trained.encode(t).tokens for t in texts]
    canonical = tokenize.canonical_wordpiece(trained)
    assert [canonical.encode(t).tokens for t in texts] == tokens
    vocab = sorted(canonical.get_vocab().items(), key=lambda kv: kv[1])
    assert [t for t, _ in vocab[:5]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [t for t, _ in vocab[5:]] == sorted(t for t, _ in vocab[5:])


def test_lowercase_and_max_samples(shards, tmp_path):
    train(shards, tmp_path / "lower", min_frequency=1)
    assert train(shards, tmp_path / "cased", lowercase=False, max_samples=50, min_frequency=1)["samples"] == 50
    cased, lower = AutoTokenizer.from_pretrained(tmp_path / "cased"), AutoTokenizer.from_pretrained(tmp_path / "lower")
    assert cased.tokenize("The fox") == ["The", "fox"] and cased.tokenize("THE") != ["the"]
    assert lower.tokenize("THE Fox") == ["the", "fox"]


def test_no_text_is_an_error(tmp_path):
    out = tmp_path / "img"
    write_shards([0, 1], lambda i: {"__key__": f"k{i}", "cls": b"1"}, out, max_count=2, compress=False,
                 workers=1, progress=False)
    with pytest.raises(ConfigError, match="has a 'txt' key"):
        train(out, tmp_path / "tok")


def test_cli(shards, tmp_path):
    out = tmp_path / "cli"
    assert main(["tokenize", str(shards), "--out", str(out), "--kind", "bpe", "--vocab-size", "300"]) == 0
    assert AutoTokenizer.from_pretrained(out).bos_token == "<s>"
    assert tokenize.inputs(tokenize.Config(shards=[str(shards)]), Context(out_dir=out)) == [str(shards)]


def test_text_that_is_not_utf8_is_skipped(tmp_path):
    out = tmp_path / "mixed"
    to_sample = lambda i: {"__key__": f"k{i}", "txt": b"\xff\xfe bad" if i == 3 else sentence(i).encode()}
    write_shards(list(range(20)), to_sample, out, max_count=20, compress=False, workers=1, progress=False)
    summary = train(out, tmp_path / "tok", vocab_size=200, min_frequency=1)
    assert summary["samples"] == 19 and summary["skipped"] == 1
