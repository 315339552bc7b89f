"""One writer per directory: two commands on one run directory, a stale lock, a lock from another host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, TINY, image_shards

from pipeline import lock


def test_two_commands_on_one_run_directory_the_second_refuses_naming_the_holder(tmp_path):
    """A long pretrain holds the run directory; a second `selfsup run` on it refuses in one line
    naming the holder; once the first is killed, its stale lock is taken over with a notice."""
    data = image_shards(tmp_path / "imgs", n=24, per_shard=12)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "r", "sources": {"imgs": {"shards": str(data), "modalities": ["image"]}},
        "modalities": {"image": {"size": 16}},
        "stages": [{"name": "pt", "stage": "pretrain", "sources": ["imgs"], "steps": 100000, "checkpoint_every": 100000,
                    "objectives": {"mae": {"decoder_width": 32, "decoder_heads": 2, "decoder_layers": 1}},
                    "encoders": {"image": TINY}, "loader": {"batch_size": 4, "num_workers": 0}}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--runs", str(tmp_path / "runs")]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    held = tmp_path / "runs" / "r" / lock.NAME
    try:
        deadline = time.time() + 60
        while not (tmp_path / "runs" / "r" / "pt" / "stage.json").exists() and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        assert held.exists(), "the first command never took the lock"
        second = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first command ended before the second tried"
    finally:
        first.kill()
        first.wait()
    err = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and err.startswith("selfsup: error: ") and "in use by pid" in err
    assert f"pid {first.pid} on {socket.gethostname()}" in err
    assert held.exists()  # SIGKILL leaves the lock behind …
    third = subprocess.run([*cmd[:5], "stages.pt.steps=1", *cmd[5:]], check=False, cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "that process is gone" in third.stderr and not held.exists()  # … and the next command takes it over


def test_a_stale_lock_of_a_dead_process_is_taken_over_one_of_another_host_only_on_request(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / lock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "command": "selfsup run", "since": 0}))
    with lock.hold(tmp_path):
        assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()
    assert "that process is gone" in caplog.text and not (tmp_path / lock.NAME).exists()
    (tmp_path / lock.NAME).write_text(json.dumps({"host": "node-17", "pid": 1, "command": "selfsup run", "since": 0}))
    with pytest.raises(lock.LockedError, match="in use by pid 1 on node-17 .*--break-lock"), lock.hold(tmp_path):
        pass
    with lock.hold(tmp_path, break_lock=True):
        pass
    assert "broken on request" in caplog.text


def test_the_shard_stage_locks_its_output_folder_and_clears_a_killed_writers_build(tmp_path):
    from pipeline.stage import Context
    from stages import shard

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"a{i}.txt").write_text(f"text {i}")
    out = tmp_path / "out"
    (out / ".building-dead").mkdir(parents=True)  # what a SIGKILLed writer leaves
    cfg = shard.Config(input=str(tmp_path / "in"), out=str(out), workers=1)
    with lock.hold(out):  # held by this process (as `selfsup shard` holds it): the stage goes on
        shard.run(cfg, Context(out_dir=tmp_path / "stage", progress=False))
    assert not (out / ".building-dead").exists() and (out / "manifest.json").is_file()
    (out / lock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "command": "selfsup shard",
                                             "since": 0}))
    with pytest.raises(lock.LockedError, match=f"in use by pid {os.getppid()}"):
        shard.run(cfg, Context(out_dir=tmp_path / "stage", progress=False))
