"""The training loop: schedules, weight-decay groups, checkpoints that survive SIGKILL and resume
bitwise, and the health monitor acting on collapse and NaN (and staying quiet on a healthy run)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import image_shards, ranks_keys
from safetensors.torch import load_file

from modalities.image import ImageConfig
from modalities.image import Modality as Image
from pipeline.config import ConfigError
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
from pipeline.encoders.base import EncoderConfig
from pipeline.objectives import mae
from pipeline.train import checkpoint
from pipeline.train.health import HealthConfig, HealthError, Monitor, effective_rank, embedding_stats
from pipeline.train.learner import Learner
from pipeline.train.loop import OptimConfig, TrainerConfig, lr_at, param_groups, train

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "patch_size": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_shards(tmp_path_factory.mktemp("train") / "shards", n=96, per_shard=12)


def setup(data: Path, seed: int = 0):
    torch.manual_seed(seed)
    image = Image(ImageConfig(size=16))
    encoders = {"image": image.encoder(EncoderConfig(**TINY))}
    learner = Learner(encoders, {"mae": mae.Objective(mae.Config(decoder_width=32, decoder_heads=2, decoder_layers=1),
                                                      encoders, "mae")})
    loader = StreamingLoader({"imgs": SourceConfig(shards=str(data), modalities=["image"])},
                             LoaderConfig(batch_size=8, num_workers=0), {"image": image.cfg}, seed=seed)
    return learner, loader


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_lr_schedule_is_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)
    assert all(lr_at(s, cfg, 110) >= lr_at(s + 1, cfg, 110) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens(data):
    learner, _ = setup(data)
    decay, no_decay = param_groups(learner, 0.05)
    names = {id(p): n for n, p in learner.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("weight") for n in decayed)
    assert not any(k in n for n in decayed for k in ("norm", "embeddings.cls", "position", "mask_token", ".pos"))
    assert "encoders.image.model.embeddings.patch_embeddings.projection.weight" in decayed  # a conv
    assert no_decay["weight_decay"] == 0 and len(decay["params"]) + len(no_decay["params"]) == \
        sum(p.requires_grad for p in learner.parameters())


def run_cli(out: Path, recipe: Path, steps: int, every: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "pretrain", "--recipe", str(recipe), "--out", str(out),
           "--sources", "[imgs]", "--objectives", "{mae: {decoder_width: 32, decoder_heads: 2, decoder_layers: 1}}",
           "--encoders", json.dumps({"image": TINY}), "--steps", str(steps), "--checkpoint-every", str(every),
           "--keep-checkpoints", "50", "--log-every", "5",
           "--loader", json.dumps({"batch_size": 8, "num_workers": 1, "ledger": str(out / "ledger")})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
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

    learner, loader = setup(data)
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
        learner, loader = setup(data)
        (tmp_path / action).mkdir()
        train(learner, loader, trainer_cfg(action), tmp_path / action, accelerator(), progress=False)
        finals.append(learner.state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    learner, _ = setup(data)
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


def trainer_cfg(action: str, **kw) -> TrainerConfig:
    return TrainerConfig(steps=8, checkpoint_every=2, log_every=1, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                         health=HealthConfig(action=action, every=1, **kw))


def test_healthy_run_triggers_nothing(data, tmp_path, caplog):
    learner, loader = setup(data)
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
    learner, loader = setup(data)
    collapse(learner)
    with pytest.raises(HealthError, match=r"step 3: embeddings collapsed: health/image/(std|rank) .* at 3 checks in a row"):
        train(learner, loader, trainer_cfg("stop"), tmp_path, accelerator(), progress=False)


def test_collapse_warns_and_goes_on(data, tmp_path, caplog):
    learner, loader = setup(data)
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
    learner, loader = setup(data)
    hits = inject_nan(learner, at_step=3)
    with caplog.at_level(logging.WARNING, logger="selfsup"):
        summary = train(learner, loader, trainer_cfg("rollback"), tmp_path, accelerator(), progress=False)
    assert hits == [3] and summary["rollbacks"] == 1 and summary["step"] == 8
    assert any("loss is nan; rolling back to step_00000002" in r.message for r in caplog.records)
    assert summary["lr"] == pytest.approx(0.5 * lr_at(7, trainer_cfg("rollback").optim, 8), rel=1e-4)
    for ckpt in (tmp_path / "checkpoints").glob("step_*"):
        assert checkpoint.nonfinite(load_file(ckpt / "model.safetensors")) is None


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    learner, loader = setup(data)
    inject_nan(learner, at_step=5)
    with pytest.raises(HealthError, match=r"step 6: loss is nan; stopped, last good checkpoint: .*step_00000004"):
        train(learner, loader, trainer_cfg("stop"), tmp_path, accelerator(), progress=False)
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step_00000004"


def test_rollbacks_are_bounded(data, tmp_path):
    learner, loader = setup(data)
    inject_nan(learner, at_step=3, times=100)
    with pytest.raises(HealthError, match="after 2 rollbacks"):
        train(learner, loader, trainer_cfg("rollback", max_rollbacks=2), tmp_path, accelerator(), progress=False)


def test_pretrain_stage_writes_encoders_stock_classes_load(data, tmp_path):
    """The encoders a pretrain stage leaves load with ``AutoModel`` and compute what it trained."""
    from transformers import AutoModel

    from pipeline.stage import Context
    from stages import pretrain

    cfg = pretrain.Config(sources=["imgs"], objectives={"mae": {"decoder_width": 32, "decoder_heads": 2}},
                          encoders={"image": TINY}, steps=3, loader={"batch_size": 8, "num_workers": 0})
    ctx = Context(out_dir=tmp_path / "pt", sources={"imgs": SourceConfig(shards=str(data), modalities=["image"])},
                  modalities={"image": ImageConfig(size=16)}, progress=False)
    ctx.out_dir.mkdir()
    summary = pretrain.run(cfg, ctx)
    assert summary["step"] == 3 and (tmp_path / "pt" / "checkpoints" / "step_00000003").is_dir()
    model = AutoModel.from_pretrained(tmp_path / "pt" / "encoders" / "image")
    weights = load_file(tmp_path / "pt" / "checkpoints" / "step_00000003" / "model.safetensors")
    # stock ViTModel adds a pooler the encoder never uses (its pooled embedding is its own)
    exported = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    assert exported and all(torch.equal(v, weights[f"encoders.image.model.{k}"]) for k, v in exported.items())


def test_several_objectives_on_a_mixture_of_sources(data, tmp_path, starter_tokenizer):
    """MAE on an image source and MLM on a text source in one stage: each batch trains the
    objective whose modality it holds, in the proportion of the source weights."""
    from conftest import STARTER

    from modalities.text import TextConfig
    from pipeline.stage import Context
    from stages import pretrain

    cfg = pretrain.Config(sources={"imgs": 1.0, "glosses": 1.0}, objectives={"mae": {"decoder_width": 32, "decoder_heads": 2},
                                                                              "mlm": {"weight": 0.5}},
                          encoders={"image": TINY, "text": TINY}, steps=12, log_every=1,
                          loader={"batch_size": 4, "num_workers": 0})
    sources = {"imgs": SourceConfig(shards=str(data), modalities=["image"]),
               "glosses": SourceConfig(shards=str(STARTER / "wordnet" / "test"), modalities=["text"])}
    ctx = Context(out_dir=tmp_path / "pt", sources=sources, progress=False,
                  modalities={"image": ImageConfig(size=16), "text": TextConfig(tokenizer=starter_tokenizer, max_length=24)})
    ctx.out_dir.mkdir()
    assert pretrain.run(cfg, ctx)["step"] == 12
    lines = [json.loads(x) for x in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]
    mae_steps = [x["step"] for x in lines if "mae/loss" in x]
    mlm_steps = [x["step"] for x in lines if "mlm/loss" in x]
    assert mae_steps and mlm_steps and sorted(mae_steps + mlm_steps) == list(range(1, 13))
    assert all(x["loss"] == pytest.approx(0.5 * x["mlm/loss"], rel=1e-4) for x in lines if "mlm/loss" in x)
    assert {p.name for p in (tmp_path / "pt" / "encoders").iterdir()} == {"image", "text"}


@pytest.mark.parametrize("objectives, message", [
    ({"mea": {}}, r"objectives: unknown objective 'mea' \(did you mean 'mae'\?\)"),
    ({"mae": {"mask_ratoi": 0.5}}, r"objectives.mae \(mae\): unknown key 'mask_ratoi' \(did you mean 'mask_ratio'\?\)"),
    ({"mae": {"mask_ratio": 1.5}}, r"objectives.mae \(mae\): mask_ratio: Input should be less than 1 \(got 1.5\)$"),
    ({"d2v": {"objective": "data2vec", "ema_strat": 0.9}}, r"objectives.d2v \(data2vec\): unknown key 'ema_strat'"),
])
def test_objective_settings_are_checked_when_the_stage_config_is_built(objectives, message):
    from pipeline.config import ConfigError, build
    from stages import pretrain

    with pytest.raises(ConfigError, match=message):
        build(pretrain.Config, {"sources": ["x"], "objectives": objectives}, "recipe.yaml: stages.pt")


def test_a_health_stop_is_one_line_and_exit_status_1(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main
    from stages import pretrain

    def stopped(cfg, ctx):
        raise HealthError("step 30: loss is nan; stopped, last good checkpoint: runs/x/checkpoints/step_00000020")

    monkeypatch.setattr(pretrain, "run", stopped)
    status = main(["pretrain", "--sources", "[x]", "--objectives", "{mae: {}}", "--out", str(tmp_path / "pt")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err == ("selfsup: stopped: step 30: loss is nan; stopped, last good checkpoint: "
                                   "runs/x/checkpoints/step_00000020")
