"""The health monitor: collapse signals that must persist, NaN that acts at once, and the
warn / stop / rollback actions inside the training loop."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import accelerator, tiny_mae, trainer_cfg
from safetensors.torch import load_file

from pipeline.train import checkpoint
from pipeline.train.health import HealthConfig, HealthError, Monitor, effective_rank, embedding_stats
from pipeline.train.learner import Learner
from pipeline.train.loop import lr_at, train


def test_health_stats_tell_collapse_from_spread():
    spread = torch.randn(64, 32)
    constant = torch.ones(64, 32)
    one_direction = torch.randn(64, 1) * torch.randn(1, 32)
    assert effective_rank(constant) == 0 and effective_rank(one_direction) < 1.01
    assert effective_rank(spread) > 20
    s = embedding_stats({"image": constant, "text": spread})
    assert s["health/image/std"] < 1e-6 and s["health/text/std"] > 0.5


def test_collapse_must_persist_a_nan_acts_at_once():
    monitor = Monitor(HealthConfig(patience=3))
    bad, good = {"loss": 1.0, "health/text/std": 1e-05, "health/text/rank": 40.0}, {"loss": 1.0, "health/text/std": 0.5}
    assert [monitor.check(m) for m in (bad, bad, good, bad, bad)] == [None] * 5  # a dip that recovers
    assert "health/text/std = 1e-05 < min_std" in monitor.check(bad)
    assert monitor.check({"loss": float("nan")}) == "loss is nan"
    assert monitor.check({"loss": 1.0, "health/x/rank": 1.0}) is None  # rank 1: a first strike only


def test_healthy_run_triggers_nothing(data, tmp_path, caplog):
    learner, loader = tiny_mae(data)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("stop"), tmp_path, accelerator(), progress=False)
    assert summary["step"] == 8 and summary["rollbacks"] == 0 and not caplog.records
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9)) and "health/image/rank" in lines[-1]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event file


def collapse(learner: Learner) -> None:
    """Constant encoder output: the final LayerNorm maps everything to 0, and stays so."""
    norm = learner.encoders["image"].model.layernorm
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
    norm.requires_grad_(False)


def test_collapse_stops_the_run(data, tmp_path):
    learner, loader = tiny_mae(data)
    collapse(learner)
    with pytest.raises(HealthError, match=r"step 3: embeddings collapsed: health/image/(std|rank) .* at 3 checks in a row"):
        train(learner, loader, trainer_cfg("stop"), tmp_path, accelerator(), progress=False)


def test_collapse_warns_and_goes_on(data, tmp_path, caplog):
    learner, loader = tiny_mae(data)
    collapse(learner)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("warn"), tmp_path, accelerator(), progress=False)
    # patience 3: warned at the 3rd and 6th check, the counts starting over after each warning
    assert summary["step"] == 8 and sum("collapsed" in r.message for r in caplog.records) == 2


def inject_nan(learner: Learner, at_step: int, times: int = 1) -> list[int]:
    """The MAE loss becomes NaN at ``at_step`` the first ``times`` times that step runs."""
    obj, hits = learner.objectives["mae"], []
    forward = obj.forward

    def poisoned(batch):
        out = forward(batch)
        if batch["__step__"] == at_step and len(hits) < times:
            hits.append(at_step)
            out["loss"] = out["loss"] * float("nan")
        return out

    obj.forward = poisoned
    return hits


def test_nan_loss_rolls_back_with_a_lower_lr(data, tmp_path, caplog):
    learner, loader = tiny_mae(data)
    hits = inject_nan(learner, at_step=3)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("rollback"), tmp_path, accelerator(), progress=False)
    assert hits == [3] and summary["rollbacks"] == 1 and summary["step"] == 8
    assert any("loss is nan; rolling back to step_00000002" in r.message for r in caplog.records)
    assert summary["lr"] == pytest.approx(0.5 * lr_at(7, trainer_cfg("rollback").optim, 8), rel=1e-4)
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        assert checkpoint.nonfinite(load_file(ckpt / "model.safetensors")) is None


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    learner, loader = tiny_mae(data)
    inject_nan(learner, at_step=5)
    with pytest.raises(HealthError, match=r"step 6: loss is nan; stopped, last good checkpoint: .*step_00000004"):
        train(learner, loader, trainer_cfg("stop"), tmp_path, accelerator(), progress=False)
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step_00000004"


def test_rollbacks_are_bounded(data, tmp_path):
    learner, loader = tiny_mae(data)
    inject_nan(learner, at_step=3, times=100)
    with pytest.raises(HealthError, match="after 2 rollbacks"):
        train(learner, loader, trainer_cfg("rollback", max_rollbacks=2), tmp_path, accelerator(), progress=False)


def test_a_finite_loss_spike_acts_like_a_nan():
    monitor = Monitor(HealthConfig(spike_factor=1000))
    assert all(monitor.check({"loss": 2.0 - 0.01 * i}) is None for i in range(10))
    assert monitor.check({"loss": 50.0}) is None  # 25× is a bad step, not a divergence
    problem = monitor.check({"loss": 2e5})
    assert problem is not None and problem.startswith("loss spiked: 2e+05 is")
    assert Monitor(HealthConfig(spike_factor=None)).check({"loss": 1e30}) is None


def test_a_loss_spike_rolls_back(data, tmp_path, caplog):
    learner, loader = tiny_mae(data)
    obj, forward = learner.objectives["mae"], learner.objectives["mae"].forward
    hits = []

    def spiking(batch):
        out = forward(batch)
        if batch["__step__"] == 5 and not hits:
            hits.append(5)
            out["loss"] = out["loss"] * 1e5
        return out

    obj.forward = spiking
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("rollback"), tmp_path, accelerator(), progress=False)
    assert hits == [5] and summary["rollbacks"] == 1 and "loss spiked" in caplog.text
