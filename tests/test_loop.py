"""The training loop: the learning-rate schedule, weight-decay groups, and a run killed by SIGKILL
that resumes to bitwise-identical weights with every sample of the epoch seen once."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, ranks_keys, tiny_mae
from safetensors.torch import load_file

from pipeline.train import checkpoint
from pipeline.train.loop import OptimConfig, lr_at, param_groups


def test_lr_schedule_is_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 110) >= lr_at(s + 1, cfg, 110) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens(data):
    learner, _ = tiny_mae(data)
    decay, no_decay = param_groups(learner, 0.05)
    names = {id(p): n for n, p in learner.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") for n in decayed)
    assert not any(k in n for n in decayed for k in ("norm", "embeddings.cls", "position", "mask_token", ".pos"))
    assert "encoders.image.model.embeddings.patch_embeddings.projection.weight" in decayed  # a conv
    assert no_decay["weight_decay"] == 0 and len(decay["params"]) + len(no_decay["params"]) == \
        sum(p.requires_grad for p in learner.parameters())


def run_cli(out: Path, recipe: Path, steps: int, every: int, fault: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", "--recipe", str(recipe), "--out", str(out),
           "--sources", "[imgs]", "--objectives", "{mae: {decoder_width: 32, decoder_heads: 2, decoder_layers: 1}}",
           "--encoders", json.dumps({"image": TINY}), "--steps", str(steps), "--checkpoint-every", str(every),
           "--keep-checkpoints", "50", "--log-every", "5",
           "--loader", json.dumps({"batch_size": 8, "num_workers": 1, "ledger": str(out / "ledger")})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if fault:
        env[checkpoint.FAULT_ENV] = fault
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_is_bitwise_identical(data, tmp_path):
    """2N steps straight vs N steps, SIGKILL, resume: the same final weights, bit for bit, and the
    ledger of consumed samples is the same (0 duplicates, 0 drops)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "seed": 3, "sources": {"imgs": {"shards": str(data), "modalities": ["image"]}},
                                  "modalities": {"image": {"size": 16}}, "stages": []}))
    steps, every = 60, 10
    straight = run_cli(tmp_path / "straight", recipe, steps, every)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]

    killed = run_cli(tmp_path / "killed", recipe, steps, every)
    first = tmp_path / "killed" / "checkpoints" / f"step_{every:08d}"
    deadline = time.time() + 300
    while not first.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    reached = checkpoint.latest(tmp_path / "killed" / "checkpoints")
    assert reached is not None and int(reached.name[5:]) < steps

    resumed = run_cli(tmp_path / "killed", recipe, steps, every)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a = load_file(tmp_path / "straight" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    keys_a, keys_b = ranks_keys(tmp_path / "straight" / "ledger")[0], ranks_keys(tmp_path / "killed" / "ledger")[0]
    assert keys_a == keys_b and len(keys_a) == steps * 8
    per_epoch = [keys_b[i: i + 96] for i in range(0, len(keys_b) - 95, 96)]
    assert all(len(set(e)) == 96 for e in per_epoch)  # each epoch: every sample once


@pytest.mark.slow
def test_bf16_launch_trains_with_fp32_weights(data, tmp_path):
    """``accelerate launch --mixed_precision bf16`` against the same launch in fp32: the stage says
    which it got, the bf16 losses differ from the fp32 ones (autocast took effect) by little, and
    the checkpoint holds fp32 weights."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "sources": {"imgs": {"shards": str(data), "modalities": ["image"]}},
                                  "modalities": {"image": {"size": 16}}, "stages": []}))
    losses = {}
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--mixed_precision", precision, "-m", "pipeline.cli", "pretrain", "--recipe", str(recipe), "--out", str(out),
               "--sources", "[imgs]", "--objectives", "{data2vec: {}}", "--encoders", json.dumps({"image": TINY}),
               "--steps", "4", "--log-every", "1", "--loader", json.dumps({"batch_size": 8, "num_workers": 0})]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"precision {precision}" in done.stderr
        losses[precision] = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(out / "checkpoints" / "step_00000004" / "model.safetensors")
        assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    assert len(losses["bf16"]) == 4 and all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"][0] != losses["no"][0] and abs(losses["bf16"][0] - losses["no"][0]) < 0.03 * losses["no"][0]


def test_killed_inside_checkpoint_writes_and_between_them_the_run_still_ends_bitwise_equal(data, tmp_path):
    """SIGKILL at named points of three checkpoint writes (after the weights, after the state,
    right after the rename) and once at a seeded moment between checkpoints; each time the run is
    resumed. The final weights equal an uninterrupted run's bit for bit, and over every epoch the
    ledger holds each sample once."""
    import random

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "seed": 5, "sources": {"imgs": {"shards": str(data), "modalities": ["image"]}},
                                  "modalities": {"image": {"size": 16}}, "stages": []}))
    steps, every = 40, 10
    straight = run_cli(tmp_path / "straight", recipe, steps, every)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()[-2000:]
    out = tmp_path / "faulty"
    for fault in ("model@10", "state@20", "renamed@30"):
        killed = run_cli(out, recipe, steps, every, fault)
        assert killed.wait(timeout=300) == -signal.SIGKILL, f"{fault}: {killed.stderr.read()[-2000:]}"
        assert not (out / "checkpoints" / f"step_{steps:08d}").exists()
    killed = run_cli(out, recipe, steps, every)
    time.sleep(random.Random(0).uniform(3.0, 5.0))  # somewhere after start-up, before the end
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    resumed = run_cli(out, recipe, steps, every)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a = load_file(tmp_path / "straight" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    b = load_file(out / "checkpoints" / f"step_{steps:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys_a, keys_b = ranks_keys(tmp_path / "straight" / "ledger")[0], ranks_keys(out / "ledger")[0]
    assert keys_a == keys_b and len(keys_b) == steps * 8
    assert all(len(set(keys_b[i: i + 96])) == 96 for i in range(0, len(keys_b) - 95, 96))
    assert not list((out / "checkpoints").glob(".*"))  # no temporary directory left behind
