"""Shards behind URLs: plain HTTP, HTTP that drops connections and answers 503, S3 (moto) through
s3fs, and ``pipe:`` commands. Each store is a real server on loopback."""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from conftest import image_shards, ranks_keys
from servers import Faults, http_server, s3_server

from modalities.image import ImageConfig
from pipeline.config import ConfigError
from pipeline.data import remote
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
from pipeline.data.shards import ShardError, iter_samples, open_shards
from pipeline.stage import Context
from stages import validate

IMAGE = {"image": ImageConfig(size=8, crop_scale=(0.3, 1.0))}
ALL = Counter(f"s{i:05d}" for i in range(120))


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    image_shards(root / "shards")
    image_shards(root / "gz", compress=True)
    return root


@pytest.fixture(scope="module")
def s3(local):
    with s3_server():
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        fs.put(str(local / "shards") + "/", "bucket/shards/", recursive=True)
        yield "s3://bucket/shards"
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    monkeypatch.setattr(remote, "BLOCK", 4096)  # many requests per shard, so faults land mid-shard


def loader(spec: str, rank: int = 0, world: int = 1, **cfg) -> StreamingLoader:
    settings = {"batch_size": 7, "num_workers": 0, "epochs": 1, "interleave": 3, **cfg}
    return StreamingLoader({"imgs": SourceConfig(shards=spec, modalities=["image"], label="cls")},
                           LoaderConfig(**settings), IMAGE, seed=3, rank=rank, world_size=world)


def interrupted_epoch(spec: str, ledger: Path, stop_after: int = 6, **cfg) -> Counter:
    """Read part of the epoch, save the position as a checkpoint would, resume in a new loader,
    finish: the ledger's keys."""
    first = loader(spec, ledger=str(ledger), **cfg)
    for _ in islice(first, stop_after):
        pass
    state = json.loads(json.dumps(first.state_dict()))
    for _ in islice(first, 2):  # read past the saved position, as a killed run would have
        pass
    second = loader(spec, ledger=str(ledger), **cfg)
    second.load_state_dict(state)
    for _ in second:
        pass
    return Counter(k.rsplit(":", 1)[1] for keys in ranks_keys(ledger).values() for k in keys)


def check(spec: str, tmp_path: Path) -> dict:
    ctx = Context(out_dir=tmp_path / "v", progress=False)
    ctx.out_dir.mkdir(exist_ok=True)
    return validate.run(validate.Config(shards=[spec], jobs=1, full=True), ctx)


def test_http_manifest_validate_and_resume(local, tmp_path):
    with http_server(local) as (url, faults):
        spec = f"{url}/shards/manifest.json"
        summary = check(spec, tmp_path)
        assert summary["status"] == "ok" and summary["samples"] == 120 and summary["shards"] == 12, summary
        assert interrupted_epoch(spec, tmp_path / "ledger") == ALL
        # the resumed units entered their shards at a recorded sample offset, not at byte 0
        offsets = {s.path.rsplit("/", 1)[1]: s.offsets for s in open_shards(spec).shards}
        entered = [(name, at) for name, at in faults.ranges if at]
        assert entered and all(at in offsets[name] for name, at in entered)


def test_faulty_http_drops_and_503s_are_retried_exactly(local, tmp_path, quick_retries):
    with http_server(local, Faults(drop_every=4, busy_every=7)) as (url, faults):
        spec = f"{url}/shards/manifest.json"
        summary = check(spec, tmp_path)
        assert summary["status"] == "ok" and summary["samples"] == 120, summary
        assert interrupted_epoch(spec, tmp_path / "ledger", num_workers=2) == ALL
        assert faults.dropped >= 3 and faults.busy >= 3, (faults.dropped, faults.busy)


def test_a_shard_that_keeps_failing(local, tmp_path, quick_retries, monkeypatch, caplog):
    monkeypatch.setattr(remote, "RETRIES", 2)
    with http_server(local, Faults(broken=("shard-000003.tar",))) as (url, _):
        spec = f"{url}/shards/manifest.json"
        with pytest.raises(ShardError, match=r"shard-000003\.tar.*503.*after 2 retries"):
            for _ in loader(spec):
                pass
        ld = loader(spec, on_error="skip", ledger=str(tmp_path / "ledger"))
        keys = Counter(k for b in ld for k in b["__key__"])
        assert ld.skipped == 10 and sum(keys.values()) == 110
        assert set(ALL) - set(keys) == {f"s{i:05d}" for i in range(30, 40)}
        assert "shard-000003.tar" in caplog.text


def test_s3_validate_resume_and_elastic(s3, tmp_path):
    summary = check(s3, tmp_path)  # the folder: its manifest is found beside the shards
    assert summary["status"] == "ok" and summary["samples"] == 120, summary
    assert interrupted_epoch(s3, tmp_path / "ledger") == ALL
    assert open_shards(f"{s3}/shard-*.tar").total == 120  # a glob lists the bucket
    # elastic: one process stops, two continue; over the epoch each sample once
    ledger = tmp_path / "elastic"
    one = loader(s3, ledger=str(ledger))
    for _ in islice(one, 5):
        pass
    saved = [json.loads(json.dumps(one.state_dict()))]
    for rank in range(2):
        ld = loader(s3, rank, 2, ledger=str(ledger))
        ld.load_state_dict(saved)
        for _ in ld:
            pass
    assert Counter(k.rsplit(":", 1)[1] for keys in ranks_keys(ledger).values() for k in keys) == ALL


def test_braces_over_urls_and_gz_from_the_start(local):
    with http_server(local) as (url, _):
        plain = open_shards(f"{url}/shards/shard-{{000000..000002}}.tar")
        assert plain.total == 30 and plain.shards[2].path.endswith("shard-000002.tar")
        gz = open_shards(f"{url}/gz/manifest.json")
        assert not gz.shards[0].offsets  # a compressed shard cannot be entered mid-stream
        got = [s["__key__"] for s in iter_samples(gz.shards[1].path, 4, 6)]
        assert got == ["s00014", "s00015"]


def test_pipe_commands(local):
    spec = f"pipe:cat {local}/shards/shard-{{000000..000003}}.tar"
    found = open_shards(spec)
    assert found.total == 40 and found.shards[1].path == f"pipe:cat {local}/shards/shard-000001.tar"
    assert [s["__key__"] for s in iter_samples(found.shards[1].path, 8)] == ["s00018", "s00019"]
    assert [s["__key__"] for s in iter_samples(f"pipe:cat {local}/gz/shard-000002.tar.gz", 9)] == ["s00029"]
    with pytest.raises(ShardError, match="status 1"):
        list(iter_samples(f"pipe:cat {local}/nothing.tar"))


def test_remote_spec_errors_are_one_line(local):
    with http_server(local) as (url, _), \
            pytest.raises(ConfigError, match=r"^shards http://.*/missing/manifest.json: no such manifest$"):
        open_shards(f"{url}/missing/manifest.json")


def test_secrets_are_redacted():
    cfg = {"loader": {"storage_options": {"s3": {"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"}}},
           "shards": "https://user:pw@host/a.tar", "session_token": "t"}
    out = remote.redact(cfg)
    assert out["loader"]["storage_options"]["s3"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert out["shards"] == "https://***@host/a.tar" and out["session_token"] == "***"


def test_read_ahead_keeps_the_order(local):
    with http_server(local) as (url, _):
        spec = f"{url}/shards/manifest.json"
        ahead = [k for b in loader(spec, read_ahead=8) for k in b["__key__"]]
        plain = [k for b in loader(spec, read_ahead=0) for k in b["__key__"]]
        assert ahead == plain and Counter(ahead) == ALL
        assert plain == [k for b in loader(str(local / "shards")) for k in b["__key__"]]  # as from local disk


def test_read_ahead_hands_over_errors_in_place_and_closes_when_abandoned():
    closed = []

    def samples(n, fail_at=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise OSError(f"broken at {i}")
                yield {"__key__": i}
        finally:
            closed.append(n)

    assert [s["__key__"] for s in remote.read_ahead(samples(50), 4)] == list(range(50))
    got = []
    with pytest.raises(OSError, match="broken at 13"):
        for s in remote.read_ahead(samples(50, fail_at=13), 4):
            got.append(s["__key__"])
    assert got == list(range(13))
    ahead = remote.read_ahead(samples(10_000), 8)
    assert [s["__key__"] for s in islice(ahead, 3)] == [0, 1, 2]
    ahead.close()  # the consumer stops early: the reader stops too and closes its source
    deadline = time.time() + 10
    while 10_000 not in closed and time.time() < deadline:
        time.sleep(0.01)
    assert 10_000 in closed


def test_s3_sessions_share_one_botocore_loader_across_workers(s3):
    """A forked worker's S3 client reuses the service models the main process parsed."""
    import multiprocessing

    fs, _ = remote.filesystem(f"{s3}/manifest.json")
    parent = id(fs.session.get_component("data_loader"))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child, text = pool.apply(_worker_loader, (f"{s3}/manifest.json",))
    assert child == parent and json.loads(text)["total"] == 120
    # arguments of the session itself (a profile) go to it, the others to s3fs
    options = remote._with_aws_session({"endpoint_url": "http://127.0.0.1:9", "profile": "other"})
    assert options["endpoint_url"] == "http://127.0.0.1:9" and options["session"].profile == "other"
    assert "profile" not in options


def _worker_loader(url: str) -> tuple[int, str]:
    fs, _ = remote.filesystem(url)
    text = remote.read_text(url)
    return id(fs.session.get_component("data_loader")), text


def test_a_local_cache_serves_later_reads(local, tmp_path):
    cache = tmp_path / "cache"
    remote.set_storage_options({"filecache": {"cache_storage": str(cache)}})
    try:
        with http_server(local) as (url, faults):
            spec = f"filecache::{url}/shards/shard-{{000000..000002}}.tar"
            first = [s["__key__"] for s in open_shards(spec).shards for s in iter_samples(s.path)]
            asked = faults.files
            again = [s["__key__"] for s in open_shards(spec).shards for s in iter_samples(s.path)]
        assert first == again and len(first) == 30
        assert len(list(cache.iterdir())) >= 3 and asked >= 3 and faults.files == asked  # nothing fetched twice
    finally:
        remote.set_storage_options(None)


def test_shard_stage_reads_a_url_and_writes_to_s3(local, s3, tmp_path):
    from stages import shard

    with http_server(local) as (url, _):
        cfg = shard.Config(input=f"{url}/shards/manifest.json", out="s3://bucket/resharded", max_count=40, workers=1)
        ctx = Context(out_dir=tmp_path / "stage", progress=False)
        ctx.out_dir.mkdir()
        summary = shard.run(cfg, ctx)
    assert summary["out"] == "s3://bucket/resharded" and summary["samples"] == 120 and summary["shards"] == 3
    again = open_shards("s3://bucket/resharded/manifest.json")
    assert [s.count for s in again.shards] == [40, 40, 40] and all(len(s.offsets) == 40 for s in again.shards)
    assert Counter(s["__key__"] for sh in again.shards for s in iter_samples(sh.path)) == ALL
    assert not (tmp_path / "stage" / "upload").exists()


def test_pretrain_over_faulty_http_sigkilled_and_resumed(tmp_path):
    """A pretrain run streaming from the fault-injecting server is SIGKILLed after its first
    checkpoint and resumed: the ledger shows each of two epochs with every sample once."""
    import signal
    import time

    from test_loop import run_cli

    from pipeline.train import checkpoint

    root = tmp_path / "store"
    image_shards(root / "shards", n=96, per_shard=12)
    with http_server(root, Faults(drop_every=5, busy_every=9)) as (url, faults):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(json.dumps({"name": "r", "seed": 3, "stages": [], "modalities": {"image": {"size": 16}},
                                      "sources": {"imgs": {"shards": f"{url}/shards/manifest.json",
                                                           "modalities": ["image"]}}}))
        out, steps, every = tmp_path / "run", 24, 6
        killed = run_cli(out, recipe, steps, every)
        first = out / "checkpoints" / f"step_{every:08d}"
        deadline = time.time() + 120
        while not first.is_dir() and killed.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
        assert int(checkpoint.latest(out / "checkpoints").name[5:]) < steps
        resumed = run_cli(out, recipe, steps, every)
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    keys = ranks_keys(out / "ledger")[0]
    assert len(keys) == steps * 8
    assert all(len(set(keys[i:i + 96])) == 96 for i in (0, 96))  # each epoch: every sample once
    assert faults.dropped and faults.busy


def test_shards_read_unchanged_by_webdataset_and_hf_datasets(local):
    """The offsets live in the manifest only: the tar files stay plain webdataset shards."""
    import datasets
    import webdataset as wds

    files = sorted(str(p) for p in (local / "shards").glob("*.tar"))
    got = [s["__key__"] for s in wds.WebDataset(files, shardshuffle=False, empty_check=False)]
    assert got == [f"s{i:05d}" for i in range(120)]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    assert len(ds) == 120 and ds[7]["__key__"] == "s00007" and ds[7]["cls"] == 3


def test_validate_indexes_shards_without_a_manifest(local, s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    for p in sorted((local / "shards").glob("*.tar"))[:3]:
        fs.put_file(str(p), f"bucket/bare/{p.name}")
    assert not open_shards("s3://bucket/bare/*.tar").shards[0].offsets
    ctx = Context(out_dir=tmp_path / "v", progress=False)
    ctx.out_dir.mkdir()
    summary = validate.run(validate.Config(shards=["s3://bucket/bare/*.tar"], jobs=1, index=True), ctx)
    assert summary["status"] == "ok" and summary["indexed"] == ["s3://bucket/bare/manifest.json"]
    fs.invalidate_cache()
    indexed, written = open_shards("s3://bucket/bare").shards, open_shards(str(local / "shards")).shards[:3]
    assert [(s.count, s.sha256, s.offsets) for s in indexed] == [(s.count, s.sha256, s.offsets) for s in written]
    with pytest.raises(ConfigError, match="exists already"):
        validate.run(validate.Config(shards=["s3://bucket/bare/*.tar"], jobs=1, index=True), ctx)
