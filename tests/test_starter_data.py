"""The shipped starter sets hold what SOURCES.md says, and their splits do not leak."""

from __future__ import annotations

import json

from conftest import STARTER

from pipeline.data.shards import iter_samples, open_shards

EMOJI_ART = ["emoji", "emoji_twitter"]


def _unified(split) -> list[str]:
    return [json.loads(s["json"])["unified"] for shard in open_shards(split).shards for s in iter_samples(shard.path)]


def test_every_emoji_art_set_splits_the_same_emoji():
    """An emoji is a test emoji in every art style or in none, so a stage that trains on several
    styles never sees, in another style, an emoji the test splits ask for."""
    splits = {name: {part: _unified(STARTER / name / part) for part in ("train", "test")} for name in EMOJI_ART}
    test = set(splits["emoji"]["test"])
    for name, parts in splits.items():
        assert len(set(parts["train"])) == len(parts["train"]) and len(set(parts["test"])) == len(parts["test"]), name
        assert set(parts["test"]) == test, f"{name}/test holds other emoji than emoji/test"
        assert not set(parts["train"]) & test, f"{name}/train holds test emoji"
        assert set(parts["train"]) == set(splits["emoji"]["train"]), name


def test_emoji_art_sets_differ_in_their_images_not_their_captions():
    google, twitter = ({k: s for shard in open_shards(STARTER / name / "test").shards
                        for s in iter_samples(shard.path) for k in [json.loads(s["json"])["unified"]]}
                       for name in EMOJI_ART)
    assert {k: g["txt"] for k, g in google.items()} == {k: twitter[k]["txt"] for k in google}
    assert sum(google[k]["png"] != twitter[k]["png"] for k in google) == len(google)
    assert not {g["__key__"] for g in google.values()} & {t["__key__"] for t in twitter.values()}
