"""Checkpoints: atomic and pruned, never holding NaN, optimizer state by parameter name, and
writing one never changes the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import accelerator, tiny_mae, trainer_cfg

from pipeline.config import ConfigError
from pipeline.train import checkpoint
from pipeline.train.health import HealthError
from pipeline.train.loop import TrainerConfig, train


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    w = {"a": torch.ones(3)}
    # optimizer state keyed by parameter name, as ``checkpoint.gather`` hands it over
    opt = {"state": {"enc.a": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 0.1, "params": ["enc.a"]}]}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, w, opt, {"data": []}, keep=2)
    (tmp_path / ".step_00000004.tmp-1").mkdir()  # a writer killed mid-way leaves only this behind
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_00000002", "step_00000003"]
    assert checkpoint.latest(tmp_path).name == "step_00000003"
    weights, optimizer, state = checkpoint.load(tmp_path / "step_00000003")
    assert torch.equal(weights["a"], w["a"]) and state["step"] == 3
    assert torch.equal(optimizer["state"]["enc.a"]["exp_avg"], torch.zeros(3)) and optimizer["param_groups"][0]["lr"] == 0.1


def test_a_checkpoint_holding_nan_is_never_written(data, tmp_path):
    from pipeline.train.loop import save

    learner, loader = tiny_mae(data)
    acc = accelerator()
    opt = torch.optim.AdamW(learner.parameters())
    _, opt = acc.prepare(learner, opt)
    with torch.no_grad():
        learner.objectives["mae"].head.weight[0, 0] = float("nan")
    with pytest.raises(HealthError, match="objectives.mae.head.weight is not finite"):
        save(tmp_path, {"step": 4, "lr_scale": 1.0, "rollbacks": 0}, learner, opt, loader, acc, TrainerConfig(), {})
    assert checkpoint.latest(tmp_path) is None


def test_checkpointing_leaves_the_run_as_it_was(data, tmp_path):
    """The checkpoint written before the first step (for rollback) must not touch the optimizer:
    a rollback run and a warn run (no early checkpoint) end with the same weights, bit for bit."""
    finals = []
    for action in ("rollback", "warn"):
        learner, loader = tiny_mae(data)
        (tmp_path / action).mkdir()
        train(learner, loader, trainer_cfg(action), tmp_path / action, accelerator(), progress=False)
        finals.append(learner.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    learner, _ = tiny_mae(data)
    opt = torch.optim.AdamW(learner.parameters())
    checkpoint.gather(learner, opt)
    assert not opt.state  # an optimizer without state keeps none


def test_optimizer_state_by_name_round_trips_and_stays_absent_where_it_was():
    """A parameter without a gradient before the checkpoint has no optimizer state in it, and has
    none after loading, even into an optimizer that had some; state keyed by position is refused."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
    opt = torch.optim.AdamW(model.parameters())
    model["a"](torch.randn(4, 3)).sum().backward()  # b gets no gradient, so no state
    opt.step()
    weights, state = checkpoint.gather(model, opt)
    assert sorted(state["state"]) == ["a.bias", "a.weight"] and state["param_groups"][0]["params"][0] == "a.weight"
    tensors, rest = checkpoint._split_optimizer(state)
    written = checkpoint._join_optimizer(tensors, rest)  # as save + load hand it back
    positional = checkpoint._join_optimizer(*checkpoint._split_optimizer(opt.state_dict()))
    for saved in (written,):
        fresh = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 3), "b": torch.nn.Linear(3, 3)})
        opt2 = torch.optim.AdamW(fresh.parameters())
        sum(m(torch.randn(4, 3)).sum() for m in fresh.values()).backward()
        opt2.step()  # b now has state the checkpoint does not
        checkpoint.scatter(fresh, opt2, weights, saved)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
        assert set(opt2.state) == {fresh["a"].weight, fresh["a"].bias}
        assert torch.equal(opt2.state[fresh["a"].weight]["exp_avg"], opt.state[model["a"].weight]["exp_avg"])
    with pytest.raises(ConfigError, match="optimizer state for 0"):  # never a silent mix-up of parameters
        checkpoint.scatter(model, opt, weights, positional)
    with pytest.raises(ConfigError, match="optimizer state for c.weight"):
        checkpoint.scatter(model, opt, weights, {**written, "state": {"c.weight": {}}})
    with pytest.raises(ConfigError, match="no weight a.bias"):  # torch's loader would keep the current one
        checkpoint.scatter(model, opt, {k: v for k, v in weights.items() if k != "a.bias"}, written)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(data, tmp_path, caplog):
    """Resume reads the newest checkpoint that loads, naming the one it skipped and why."""
    import logging

    learner, loader = tiny_mae(data)
    train(learner, loader, trainer_cfg("warn").model_copy(update={"steps": 4}), tmp_path, accelerator(), progress=False)
    newest = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a copy cut short
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000004/model.safetensors: unreadable"):
        checkpoint.load(newest.parent)
    learner, loader = tiny_mae(data)
    with caplog.at_level(logging.INFO, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("warn").model_copy(update={"steps": 6}), tmp_path, accelerator(),
                        progress=False)
    assert "skipping checkpoint step_00000004" in caplog.text and "resumed from" in caplog.text
    assert "step_00000002" in caplog.text.split("resumed from")[1] and summary["step"] == 6
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the steps trained again after the resume are logged once


def test_a_full_disk_is_one_line_and_leaves_no_temporary_directory(tmp_path, monkeypatch):
    import errno

    w, opt = {"a": torch.ones(3)}, {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    checkpoint.save(tmp_path, 1, w, opt, {"data": []})
    (tmp_path / ".step_00000007.tmp-99999").mkdir()  # left by a writer killed earlier

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000002: checkpoint not written: No space left on device"):
        checkpoint.save(tmp_path, 2, w, opt, {"data": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
