"""Two real processes (``accelerate launch``) split the data: disjoint samples whose union is all,
also when resuming from a one-process run's saved position (elastic)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from conftest import REPO, image_shards, launch_two, ranks_keys

from modalities.image import ImageConfig
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader

N = 120


def launch(*args: str) -> str:
    return launch_two(str(REPO / "tests" / "_dist_worker.py"), *args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_shards(tmp_path_factory.mktemp("dist") / "shards", n=N, per_shard=10)


def test_two_processes_see_disjoint_samples_whose_union_is_all(data, tmp_path):
    out = launch("--shards", str(data), "--ledger", str(tmp_path / "ledger"), "--workers", "2")
    assert f"world=2 total={N}" in out
    keys = ranks_keys(tmp_path / "ledger")
    assert set(keys) == {0, 1} and keys[0] and keys[1]
    assert not set(keys[0]) & set(keys[1])
    assert Counter(keys[0] + keys[1]) == Counter({k: 1 for k in keys[0] + keys[1]}) and len(keys[0] + keys[1]) == N


def test_resume_one_process_run_on_two_processes(data, tmp_path):
    ledger = tmp_path / "ledger"
    one = StreamingLoader({"imgs": SourceConfig(shards=str(data), modalities=["image"], label="cls")},
                          LoaderConfig(batch_size=8, num_workers=2, epochs=1, ledger=str(ledger)),
                          {"image": ImageConfig(size=8)}, seed=11)
    for _ in islice(one, 5):
        pass
    state = tmp_path / "state.json"
    state.write_text(json.dumps([one.state_dict()]))
    before = ranks_keys(ledger)[0]
    assert len(before) == 40
    out = launch("--shards", str(data), "--ledger", str(ledger), "--resume", str(state))
    assert f"world=2 total={N - 40}" in out
    keys = ranks_keys(ledger)
    everything = keys[0] + keys[1]
    assert everything[:40] == before  # rank 0's file still starts with the one-process run's batches
    assert len(everything) == len(set(everything)) == N  # 0 duplicates, 0 drops over the epoch
