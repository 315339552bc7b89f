"""The shipped starter emoji sets: every art style holds the same emoji under the same split."""

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
