"""The local cache of remote shards (``loader.cache``), against the loopback HTTP server: later
passes read the copies, the size bound holds, a killed download is never served, and the samples,
their order and the exact resume are those of reading the store."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from conftest import REPO, image_shards, ranks_keys
from servers import http_server

from modalities.image import ImageConfig
from pipeline.data import cache as cache_mod
from pipeline.data.cache import Filling, ShardCache
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
from pipeline.data.shards import open_shards

IMAGE = {"image": ImageConfig(size=8, crop_scale=(0.3, 1.0))}
ALL = Counter(f"s{i:05d}" for i in range(120))
SHARDS = [f"shard-{i:06d}.tar" for i in range(12)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    image_shards(root / "shards")
    image_shards(root / "one", n=10, per_shard=10)
    return root


def loader(spec: str, cache: Path | None = None, max_bytes: int = 1 << 30, **cfg) -> StreamingLoader:
    settings = {"batch_size": 7, "num_workers": 0, "epochs": 1, "interleave": 3, **cfg}
    if cache is not None:
        settings["cache"] = {"dir": str(cache), "max_bytes": max_bytes}
    return StreamingLoader({"imgs": SourceConfig(shards=spec, modalities=["image"], label="cls")},
                           LoaderConfig(**settings), IMAGE, seed=3)


def batches(ld: StreamingLoader) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    return [(b["__key__"], b["image"], b["cls"]) for b in ld]


def same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ia, ib) and torch.equal(ca, cb)
                                    for (ka, ia, ca), (kb, ib, cb) in zip(a, b))


def tar_gets(faults, since: int = 0) -> Counter:
    """Range GETs of each shard file since the ``since``-th request."""
    return Counter(name for name, _ in faults.ranges[since:] if name.endswith(".tar"))


def read_all(f) -> bytes:
    with f:
        return b"".join(iter(lambda: f.read(1000), b""))


def test_later_epochs_and_runs_read_the_copies(store, tmp_path):
    with http_server(store) as (url, faults):
        spec = f"{url}/shards/manifest.json"
        plain = batches(loader(spec, epochs=2, num_workers=2))
        mark = len(faults.ranges)
        # over two epochs each shard is fetched once, in the first
        got = batches(loader(spec, tmp_path / "once", epochs=2))
        assert tar_gets(faults, mark) == Counter(SHARDS)
        assert same(got, batches(loader(spec, epochs=2)))
        # two workers share a folder: each puts the copies of its own shards in place
        mark = len(faults.ranges)
        got = batches(loader(spec, tmp_path / "cache", num_workers=2))
        assert tar_gets(faults, mark) == Counter(SHARDS) and same(got, batches(loader(spec, num_workers=2)))
        files = faults.files
        open_shards(spec)
        manifest = faults.files - files
        mark, files = len(faults.ranges), faults.files
        again = batches(loader(spec, tmp_path / "cache", epochs=2, num_workers=2))
        assert same(again, plain) and not tar_gets(faults, mark)
        assert faults.files == files + manifest  # another run asks the store for the manifest only
    kept = ShardCache(tmp_path / "cache", 1 << 30).entries()
    assert sorted(p.name.split("-", 1)[1] for _, _, p in kept) == SHARDS
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(cache_mod.PART)]


def test_the_size_bound_evicts_the_least_recently_read(store, tmp_path):
    sizes = [(store / "shards" / n).stat().st_size for n in SHARDS]
    bound = 3 * max(sizes) + min(sizes) // 2  # room for three shards, not four
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.bin").write_bytes(b"x" * bound)  # not a copy: neither counted nor deleted
    with http_server(store) as (url, _):
        spec = f"{url}/shards/manifest.json"
        keys = Counter(k for keys, _, _ in batches(loader(spec, folder, bound)) for k in keys)
        assert keys == ALL
        cache = ShardCache(folder, bound)
        kept = {p.name.split("-", 1)[1] for _, _, p in cache.entries()}
        assert len(kept) == 3 and cache.size() <= bound
        ld = loader(spec, folder, bound, num_workers=2)  # two workers putting copies in place
        assert Counter(k for keys, _, _ in batches(ld) for k in keys) == ALL
        assert len(cache.entries()) == 3 and cache.size() <= bound
        assert (folder / "notes.bin").stat().st_size == bound

        # least recently *read*, not least recently written: a hit marks a copy as used
        one = ShardCache(tmp_path / "lru", 2 * max(sizes) + min(sizes) // 2)
        first, second, third = (f"{url}/shards/{n}" for n in SHARDS[:3])
        for u in (first, second):
            assert read_all(one.open(u)) == (store / "shards" / u.rsplit("/", 1)[1]).read_bytes()
        assert one.kept == 2 and one.evicted == 0
        hit = one.open(first)
        assert not isinstance(hit, Filling)
        read_all(hit)
        read_all(one.open(third))
        assert one.evicted == 1 and {p.name.split("-", 1)[1] for _, _, p in one.entries()} == {SHARDS[0], SHARDS[2]}


def test_a_killed_download_is_never_served(store, tmp_path):
    folder = tmp_path / "cache"
    with http_server(store) as (url, _):
        shard = f"{url}/shards/{SHARDS[4]}"
        script = ("import os, signal\n"
                  "from pipeline.data.cache import ShardCache\n"
                  f"f = ShardCache({str(folder)!r}, 1 << 30).open({shard!r})\n"
                  "f.read(3000)\n"
                  "os.kill(os.getpid(), signal.SIGKILL)\n")
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             check=False)
        assert run.returncode == -9
        parts = [p for p in folder.iterdir() if p.name.startswith(cache_mod.PART)]
        whole = (store / "shards" / SHARDS[4]).read_bytes()
        assert len(parts) == 1 and parts[0].stat().st_size < len(whole)  # part of a download, left behind
        cache = ShardCache(folder, 1 << 30)
        f = cache.open(shard)
        assert cache.entries() == [] and isinstance(f, Filling)  # not a copy: a miss
        assert read_all(f) == whole
        assert [p.name.split("-", 1)[1] for _, _, p in cache.entries()] == [SHARDS[4]]
        assert parts[0].exists()  # a recent partial file may be a download in flight: left alone
        old = time.time() - cache_mod.STALE - 10
        os.utime(parts[0], (old, old))
        read_all(cache.open(f"{url}/shards/{SHARDS[5]}"))  # the next copy put in place cleans up
        assert not parts[0].exists() and cache.kept == 2


def test_resume_is_exact_cold_and_warm(store, tmp_path):
    folder = tmp_path / "cache"
    with http_server(store) as (url, faults):
        spec = f"{url}/shards/manifest.json"
        for attempt in range(2):  # first with an empty folder, then with what the first kept
            ledger = tmp_path / f"ledger{attempt}"
            first = loader(spec, folder, ledger=str(ledger))
            for _ in islice(first, 6):
                pass
            state = json.loads(json.dumps(first.state_dict()))
            for _ in islice(first, 2):
                pass
            kept_before = {p.name.split("-", 1)[1] for _, _, p in ShardCache(folder, 1 << 30).entries()}
            mark = len(faults.ranges)
            second = loader(spec, folder, ledger=str(ledger))
            second.load_state_dict(state)
            for _ in second:
                pass
            assert Counter(k.rsplit(":", 1)[1] for keys in ranks_keys(ledger).values() for k in keys) == ALL
            assert not set(tar_gets(faults, mark)) & kept_before  # a kept shard is resumed from its copy
        for _, _, path in ShardCache(folder, 1 << 30).entries():  # every copy is its shard, byte for byte
            assert path.read_bytes() == (store / "shards" / path.name.split("-", 1)[1]).read_bytes()


def test_a_shard_cut_into_slices_is_kept_by_its_first_slice(store, tmp_path):
    """One shard, two streams: each reads half. The reader of the first half reads on to the end
    of the file, so the second epoch reads nothing from the store."""
    with http_server(store) as (url, faults):
        spec = f"{url}/one/manifest.json"
        plain = batches(loader(spec, num_workers=2))
        got = batches(loader(spec, tmp_path / "cache", num_workers=2))
        mark = len(faults.ranges)
        again = batches(loader(spec, tmp_path / "cache", num_workers=2))
        assert same(got, plain) and same(again, plain) and not tar_gets(faults, mark)


def test_what_is_not_kept(store, tmp_path, caplog):
    with http_server(store) as (url, _):
        cache = ShardCache(tmp_path / "cache", 1 << 30)
        local = (store / "shards" / SHARDS[0]).read_bytes()
        # a shard that is not what its manifest says is read as it is, but not kept
        with caplog.at_level(logging.WARNING):
            assert read_all(cache.open(f"{url}/shards/{SHARDS[0]}", sha256="0" * 64)) == local
        assert "sha256 differs" in caplog.text and cache.entries() == []
        # a reader that enters mid-file keeps nothing; one that stops early neither
        f = cache.open(f"{url}/shards/{SHARDS[0]}")
        f.seek(1024)
        assert read_all(f) == local[1024:]
        f = cache.open(f"{url}/shards/{SHARDS[0]}")
        f.read(2000)
        f.close()
        # a shard larger than the whole cache
        small = ShardCache(tmp_path / "small", len(local) - 1)
        assert read_all(small.open(f"{url}/shards/{SHARDS[0]}")) == local
        assert cache.entries() == [] and small.entries() == []
        assert not [p for d in ("cache", "small") for p in (tmp_path / d).iterdir() if p.name.startswith(".part")]
        # forward seeks while copying read the bytes stepped over; pipe: commands are kept too
        f = cache.open(f"{url}/shards/{SHARDS[1]}")
        assert f.read(10) == (store / "shards" / SHARDS[1]).read_bytes()[:10]
        f.seek(5000, 1)
        assert read_all(f) == (store / "shards" / SHARDS[1]).read_bytes()[5010:]
        pipe = f"pipe:cat {store}/shards/{SHARDS[2]}"
        assert read_all(cache.open(pipe)) == read_all(cache.open(pipe)) == (store / "shards" / SHARDS[2]).read_bytes()
        assert cache.hits == 1 and len(cache.entries()) == 2


def test_readers_racing_for_one_shard(store, tmp_path):
    with http_server(store) as (url, _):
        cache = ShardCache(tmp_path / "cache", 1 << 30)
        shard, out = f"{url}/shards/{SHARDS[7]}", []
        threads = [threading.Thread(target=lambda: out.append(read_all(cache.open(shard)))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert out == [(store / "shards" / SHARDS[7]).read_bytes()] * 4
    assert len(cache.entries()) == 1 and sorted(os.listdir(tmp_path / "cache")) == [".lock", cache.entries()[0][2].name]
