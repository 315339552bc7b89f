"""Streaming loader: exact resume, elastic resume, ledger, bad samples, augmentation determinism."""

from __future__ import annotations

import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import image_shards, png, ranks_keys

from modalities.image import ImageConfig
from pipeline.data.loader import LoaderConfig, SampleError, SourceConfig, StreamingLoader
from pipeline.data.writer import write_shards

IMAGE = {"image": ImageConfig(size=8, crop_scale=(0.3, 1.0))}


def loader(shards: Path, rank: int = 0, world: int = 1, **cfg) -> StreamingLoader:
    settings = {"batch_size": 7, "num_workers": 0, "epochs": 1, "interleave": 3, **cfg}
    return StreamingLoader({"imgs": SourceConfig(shards=str(shards), modalities=["image"], label="cls")},
                           LoaderConfig(**settings), IMAGE, seed=3, rank=rank, world_size=world)


def flat(batches) -> list[tuple[str, torch.Tensor]]:
    return [(k, b["image"][i]) for b in batches for i, k in enumerate(b["__key__"])]


def same(a, b) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def ledger_keys(folder: Path) -> list[str]:
    """Every rank's keys, rank by rank."""
    return [k for keys in ranks_keys(folder).values() for k in keys]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(shards, workers):
    full = flat(loader(shards, num_workers=workers, epochs=2))
    first = loader(shards, num_workers=workers, epochs=2)
    head = flat(islice(first, 5))
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = loader(shards, num_workers=workers, epochs=2)
    second.load_state_dict(state)
    tail = flat(second)
    assert len(full) == 240
    assert same(head + tail, full)


def test_every_sample_once_per_epoch_in_a_seeded_order(shards):
    keys = [k for k, _ in flat(loader(shards, epochs=2))]
    assert Counter(keys[:120]) == Counter(keys[120:]) == Counter(f"s{i:05d}" for i in range(120))
    assert keys[:120] != keys[120:]  # each epoch has its own order
    assert keys == [k for k, _ in flat(loader(shards, epochs=2))]  # and the order is a function of the seed


@pytest.mark.parametrize("before, after", [((1, 2), (2, 2)), ((2, 1), (1, 2)), ((1, 1), (3, 1))])
def test_elastic_resume_keeps_each_epoch_exactly_once(shards, tmp_path, before, after):
    """(processes, workers) change between save and resume: the ledger over two epochs shows every
    sample exactly twice (once per epoch), no duplicate within an epoch and nothing dropped."""
    ledger = tmp_path / "ledger"
    world, workers = before
    saved = []
    for rank in range(world):
        ld = loader(shards, rank, world, num_workers=workers, epochs=2, ledger=str(ledger))
        for _ in islice(ld, 4 + rank):  # ranks stop at different points, as in a real run
            pass
        saved.append(json.loads(json.dumps(ld.state_dict())))
    world, workers = after
    for rank in range(world):
        ld = loader(shards, rank, world, num_workers=workers, epochs=2, ledger=str(ledger))
        ld.load_state_dict(saved)
        for _ in ld:
            pass
    keys = ledger_keys(ledger)
    assert Counter(keys) == Counter({f"imgs:{k}": 2 for k in _all_keys(shards)})


def _all_keys(shards: Path) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [f"{e['path']}:s{i:05d}" for e in manifest["shards"] for i in range(int(e["path"][6:12]) * 10, int(e["path"][6:12]) * 10 + 10)]


def test_resume_truncates_ledger_of_replayed_batches(shards, tmp_path):
    ledger = tmp_path / "ledger"
    ld = loader(shards, ledger=str(ledger))
    for _ in islice(ld, 3):
        pass
    state = ld.state_dict()
    for _ in islice(ld, 2):  # consumed after the checkpoint: lost in a crash, replayed on resume
        pass
    resumed = loader(shards, ledger=str(ledger))
    resumed.load_state_dict(state)
    for _ in resumed:
        pass
    assert Counter(ledger_keys(ledger)) == Counter({f"imgs:{k}": 1 for k in _all_keys(shards)})


def test_augmentation_does_not_depend_on_workers_or_processes(shards):
    one = dict(flat(loader(shards)))
    split = {}
    for rank in range(2):
        split.update(flat(loader(shards, rank, 2, num_workers=2)))
    assert one.keys() == split.keys()
    assert all(torch.equal(one[k], split[k]) for k in one)
    plain = dict(flat(loader(shards, augment=False)))
    assert any(not torch.equal(one[k], plain[k]) for k in one)  # augmentation is really applied


def test_views_are_a_function_of_the_sample_and_view_only(shards):
    """Extra views (``views: 3``): view 0 is what one view gives, the others differ from it and from
    each other, and every view is the same whatever the number of processes and workers."""
    def views(batches) -> dict[str, list[torch.Tensor]]:
        return {k: [b["image"][i], *(b["__views__"]["image"][v][i] for v in ("1", "2"))]
                for b in batches for i, k in enumerate(b["__key__"])}

    three = views(loader(shards, views=3))
    one = dict(flat(loader(shards)))
    split = {}
    for rank in range(2):
        split.update(views(loader(shards, rank, 2, num_workers=2, views=3)))
    assert three.keys() == one.keys() == split.keys()
    for k, (v0, v1, v2) in three.items():
        assert torch.equal(v0, one[k]) and all(torch.equal(a, b) for a, b in zip(three[k], split[k]))
    assert all(not torch.equal(v[0], v[1]) and not torch.equal(v[1], v[2]) for v in three.values())


def _part(shards: Path, **split) -> list[str]:
    src = SourceConfig(shards=str(shards), modalities=["image"], label="cls", **split)
    return [k for b in StreamingLoader({"s": src}, LoaderConfig(batch_size=5, num_workers=0, epochs=1), IMAGE)
            for k in b["__key__"]]


def test_a_held_out_split_is_disjoint_complete_and_by_group(tmp_path):
    """``holdout``: the rest and the held-out part cover every sample once, the share is near the
    setting, it does not depend on the shards; ``holdout_by``: a json field's groups stay whole."""
    write_shards(list(range(200)), lambda i: {"__key__": f"s{i:05d}", "png": png(i), "cls": b"0",
                                              "json": json.dumps({"speaker": f"v{i % 10}"}).encode()},
                 tmp_path / "a", max_count=10, workers=1, progress=False)
    write_shards(list(range(200)), lambda i: {"__key__": f"s{i:05d}", "png": png(i), "cls": b"0",
                                              "json": json.dumps({"speaker": f"v{i % 10}"}).encode()},
                 tmp_path / "b", max_count=70, workers=1, progress=False)
    rest, held = _part(tmp_path / "a", holdout=0.25), _part(tmp_path / "a", holdout=0.25, part="holdout")
    assert not set(rest) & set(held) and sorted(rest + held) == [f"s{i:05d}" for i in range(200)]
    assert 0.15 < len(held) / 200 < 0.35
    assert sorted(held) == sorted(_part(tmp_path / "b", holdout=0.25, part="holdout"))  # other shards, same split
    voices = _part(tmp_path / "a", holdout=0.3, holdout_by="speaker", part="holdout")
    speakers = {int(k[1:]) % 10 for k in voices}
    assert speakers and len(voices) == 20 * len(speakers)  # every sample of a held-out voice, none of the others
    with pytest.raises(SampleError, match="no json field 'voice'"):
        _part(tmp_path / "a", holdout=0.3, holdout_by="voice")
    for unsplit in ({"part": "holdout"}, {"holdout_by": "speaker"}):  # a "validation" source that is the whole set
        with pytest.raises(ValueError, match="needs holdout"):
            SourceConfig(shards="x", modalities=["image"], **unsplit)
    with pytest.raises(ValueError, match="needs augment"):
        LoaderConfig(views=2, augment=False)


def test_mixture_follows_weights_and_is_the_same_on_every_rank(tmp_path):
    a = image_shards(tmp_path / "a", n=200, per_shard=20)
    b = image_shards(tmp_path / "b", n=200, per_shard=20)
    sources = {"a": SourceConfig(shards=str(a), modalities=["image"], weight=3.0),
               "b": SourceConfig(shards=str(b), modalities=["image"], weight=1.0)}
    picks = []
    for rank in range(2):
        ld = StreamingLoader(sources, LoaderConfig(batch_size=2, num_workers=0), IMAGE, seed=1, rank=rank, world_size=2)
        picks.append([batch["__source__"] for batch in islice(ld, 80)])
    assert picks[0] == picks[1]
    assert 0.6 < picks[0].count("a") / 80 < 0.9


def test_exact_resume_of_a_mixture_keeps_the_source_of_every_batch(tmp_path):
    """The saved position names the next batch, so a resumed mixture picks the same sources."""
    sources = {n: SourceConfig(shards=str(image_shards(tmp_path / n, n=60)), modalities=["image"]) for n in "ab"}

    def mixed():
        return StreamingLoader(sources, LoaderConfig(batch_size=3, num_workers=0, epochs=1), IMAGE, seed=1)

    def picks(batches):
        return [(b["__source__"], b["__key__"]) for b in batches]

    full, first = picks(mixed()), mixed()
    head = picks(islice(first, 5))
    second = mixed()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + picks(second) == full


def broken_shards(tmp_path: Path) -> Path:
    """Three shards of 4; sample ``s00005`` holds bytes that are not an image."""
    out = tmp_path / "broken"
    write_shards(list(range(12)), lambda i: {"__key__": f"s{i:05d}", "png": b"not a png" if i == 5 else png(i),
                                             "cls": b"1"}, out, max_count=4, compress=False, workers=1, progress=False)
    return out


def test_bad_sample_raises_naming_shard_and_key(tmp_path):
    with pytest.raises(SampleError, match=r"shard-000001\.tar: sample 's00005': cannot decode png"):
        list(loader(broken_shards(tmp_path)))


def test_bad_sample_skip_is_counted_and_logged(tmp_path, caplog):
    ld = loader(broken_shards(tmp_path), on_error="skip")
    with caplog.at_level(logging.WARNING):
        keys = [k for k, _ in flat(ld)]
    assert sorted(keys) == [f"s{i:05d}" for i in range(12) if i != 5]
    assert ld.skipped == 1 and ld.state_dict()["skipped"] == 1
    assert "s00005" in caplog.text


def test_truncated_shard_raises_or_is_skipped(tmp_path, caplog):
    out = image_shards(tmp_path / "cut", n=12, per_shard=4)
    path = out / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:2500])  # ends inside its second sample
    with pytest.raises(Exception, match="shard-000002.tar"):
        list(loader(out))
    ld = loader(out, on_error="skip")
    with caplog.at_level(logging.WARNING):
        keys = [k for k, _ in flat(ld)]
    assert len(keys) == len(set(keys)) and set(keys) >= {f"s{i:05d}" for i in range(8)}
    assert len(keys) + ld.skipped == 12 and ld.skipped >= 3
    assert "shard-000002.tar" in caplog.text


def test_resume_refuses_another_seed_or_changed_shards(shards, tmp_path):
    from pipeline.config import ConfigError

    ld = loader(shards)
    next(iter(ld))
    other = StreamingLoader({"imgs": SourceConfig(shards=str(shards), modalities=["image"])},
                            LoaderConfig(num_workers=0), IMAGE, seed=4)
    with pytest.raises(ConfigError, match="seed 3"):
        other.load_state_dict(ld.state_dict())
    fewer = image_shards(tmp_path / "fewer", n=110)
    with pytest.raises(ConfigError, match="imgs changed"):
        loader(fewer).load_state_dict(ld.state_dict())


def test_sample_rng_is_a_function_of_seed_epoch_and_key():
    from pipeline.data.seeding import sample_rng

    def draws(rng):
        return [rng.random(), rng.uniform(2, 3), rng.randint(0, 9), rng.getrandbits(130), rng.gauss(0, 1),
                rng.choice("abcdef"), [rng.random() for _ in range(20)]]

    assert draws(sample_rng(1, 2, "a:b")) == draws(sample_rng(1, 2, "a:b"))
    others = [draws(sample_rng(*args)) for args in [(0, 2, "a:b"), (1, 3, "a:b"), (1, 2, "a:c")]]
    assert all(d != draws(sample_rng(1, 2, "a:b")) for d in others)
    rng = sample_rng(0, 0, "k")
    state = rng.getstate()
    first = draws(rng)
    rng.setstate(state)
    assert draws(rng) == first
    values = [sample_rng(0, 0, str(i)).random() for i in range(2000)]
    assert 0.45 < sum(values) / len(values) < 0.55 and 0 <= min(values) and max(values) < 1
