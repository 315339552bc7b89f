"""The shipped starter sets that come twice: every emoji art style holds the same emoji under the same
split, and every speech engine speaks the same words with its test voices kept out of training."""

from __future__ import annotations

import json

from conftest import STARTER

from pipeline.data.shards import iter_samples, open_shards

EMOJI_ART = ["emoji", "emoji_twitter"]


def _by_emoji(split) -> dict[str, dict]:
    """``unified`` → sample of one split; no emoji twice in it."""
    samples = [s for shard in open_shards(split).shards for s in iter_samples(shard.path)]
    out = {json.loads(s["json"])["unified"]: s for s in samples}
    assert len(out) == len(samples), f"{split}: an emoji twice"
    return out


def test_every_emoji_art_set_splits_the_same_emoji():
    """An emoji is a test emoji in every art style or in none, so a stage that trains on several
    styles never sees, in another style, an emoji the test splits ask for."""
    splits = {name: {part: set(_by_emoji(STARTER / name / part)) for part in ("train", "test")} for name in EMOJI_ART}
    test, train = splits["emoji"]["test"], splits["emoji"]["train"]
    for name, parts in splits.items():
        assert parts["test"] == test, f"{name}/test holds other emoji than emoji/test"
        assert not parts["train"] & test, f"{name}/train holds test emoji"
        assert parts["train"] == train, name


def test_emoji_art_sets_differ_in_their_images_not_their_captions():
    google, twitter = (_by_emoji(STARTER / name / "test") for name in EMOJI_ART)
    assert {k: g["txt"] for k, g in google.items()} == {k: twitter[k]["txt"] for k in google}
    assert sum(google[k]["png"] != twitter[k]["png"] for k in google) == len(google)
    assert not {g["__key__"] for g in google.values()} & {t["__key__"] for t in twitter.values()}


SPEECH_ENGINES = ["speech", "speech_flite"]


def _voices_and_words(split) -> tuple[set[str], dict[str, int]]:
    """(voices, word → class id) of one speech split, each word always under one id."""
    voices, words = set(), {}
    for shard in open_shards(split).shards:
        for s in iter_samples(shard.path):
            meta = json.loads(s["json"])
            voices.add(meta["voice"])
            assert words.setdefault(s["txt"].decode(), int(s["cls"])) == int(s["cls"]), f"{split}: {s['__key__']}"
    return voices, words


def test_speech_engines_keep_their_test_voices_out_of_training_and_share_the_words():
    """A test voice is heard in no train split of any engine, and class ``k`` is the same word in all."""
    parts = {name: {part: _voices_and_words(STARTER / name / part) for part in ("train", "test")}
             for name in SPEECH_ENGINES}
    train_voices = set().union(*(p["train"][0] for p in parts.values()))
    words = parts["speech"]["train"][1]
    for name, p in parts.items():
        assert p["test"][0] and not p["test"][0] & train_voices, f"{name}/test: a voice also heard in training"
        assert p["train"][1] == p["test"][1] == words, f"{name}: other words or ids than speech/train"
