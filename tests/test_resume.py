"""Loader position (``pipeline.data.state``) and resume (``pipeline.data.resume``): typed, json
round trip, a pure function of the old states and the new topology, no import of the loader."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from itertools import islice

import pytest
from conftest import REPO

from pipeline.config import ConfigError
from pipeline.data.resume import Topology, resume
from pipeline.data.state import LoaderState, Segment, SourceCursor, StreamState, Unit, plan_epoch


def started(counts: list[int], world: int, workers: int, taken: int) -> list[LoaderState]:
    """Every rank's state after each stream consumed ``taken`` samples of its epoch-0 share."""
    states = []
    for rank in range(world):
        streams = {}
        for w in range(workers):
            sid = rank * workers + w
            units = plan_epoch(counts, 0, "a", 0, world * workers)[sid]
            cursor = SourceCursor(picks=taken, next_epoch=1)
            left, rest = taken, []
            for u in units:
                eat = min(left, u.left)
                left -= eat
                if u.left > eat:
                    rest.append(Unit(u.shard, u.start + eat, u.stop))
            cursor.segments = [Segment(0, rest)] if rest else []
            streams[sid] = StreamState(batch=w + 3 * workers, sources={"a": cursor})
        states.append(LoaderState(0, rank, world, workers, {"a": counts}, streams, batches=3))
    return states


def test_state_round_trips_through_json():
    (state,) = started([10] * 6, 1, 2, 4)
    again = LoaderState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state
    assert isinstance(again.streams[1].sources["a"].segments[0].units[0], Unit)


def test_wrong_version_is_one_line():
    (state,) = started([10] * 6, 1, 1, 0)
    data = {**state.to_json(), "version": 1}
    with pytest.raises(ConfigError, match=r"^data position: loader state version 1, this pipeline reads version 2"):
        LoaderState.from_json(data)
    with pytest.raises(ConfigError, match="malformed"):
        LoaderState.from_json({"version": 2, "seed": 0})


@pytest.mark.parametrize("before, after", [((1, 2), (2, 2)), ((2, 2), (1, 3)), ((2, 1), (2, 1))])
def test_resume_is_pure_and_deals_every_leftover_once(before, after):
    counts = [10] * 6
    old = started(counts, *before, taken=4)
    frozen = copy.deepcopy(old)
    world, workers = after
    new = [resume(old, Topology(r, world, workers, 0, {"a": counts})) for r in range(world)]
    assert old == frozen  # inputs untouched
    assert new == [resume(old, Topology(r, world, workers, 0, {"a": counts})) for r in range(world)]

    def samples(states):
        return Counter((u.shard, i) for st in states for s in st.streams.values()
                       for seg in s.sources["a"].segments for u in seg.units for i in range(u.start, u.stop))

    assert samples(new) == samples(old)
    assert sum(samples(old).values()) == 60 - 4 * before[0] * before[1]
    assert sorted(k for st in new for k in st.streams) == list(range(world * workers))


def test_resume_checks_ranks_seed_and_shards():
    old = started([10] * 6, 2, 1, 2)
    with pytest.raises(ConfigError, match=r"holds ranks \[0\], expected all of 0..1"):
        resume(old[:1], Topology(0, 2, 1, 0, {"a": [10] * 6}))
    with pytest.raises(ConfigError, match="seed 0, resuming with seed 5"):
        resume(old, Topology(0, 2, 1, 5, {"a": [10] * 6}))
    with pytest.raises(ConfigError, match="source.s. a changed"):
        resume(old, Topology(0, 2, 1, 0, {"a": [10] * 5}))


def test_loader_state_dict_is_loader_state_json(shards):
    from modalities.image import ImageConfig
    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader

    ld = StreamingLoader({"imgs": SourceConfig(shards=str(shards), modalities=["image"])},
                         LoaderConfig(batch_size=5, num_workers=0, epochs=1), {"image": ImageConfig(size=8)})
    for _ in islice(ld, 3):
        pass
    state = LoaderState.from_json(json.loads(json.dumps(ld.state_dict())))
    assert state.batches == 3 and state.streams[0].batch == 3 and state.streams[0].sources["imgs"].picks == 15
    with pytest.raises(ConfigError, match="version"):
        ld.load_state_dict({**ld.state_dict(), "version": 1})


def test_state_and_resume_do_not_import_the_loader():
    code = ("import sys, pipeline.data.resume, pipeline.data.state; "
            "assert 'pipeline.data.loader' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
