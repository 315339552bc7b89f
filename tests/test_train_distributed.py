"""Two real processes (``accelerate launch``): the same loss and gradients as one process with the
concatenated batch (CLIP and joint contrast across processes through gathered features), and the pretrain
recipe running on two processes: one-process stages on process 0, the pretrain stage on both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, launch_two, ranks_keys
from test_objectives import batch_for, learner, split, starter_batch

CASES = {"clip-image-text": ("clip", ("image", "text")), "mae-image": ("mae", ("image",)),
         "data2vec-audio": ("data2vec", ("audio",)), "joint-image": ("joint", ("image",))}


def test_two_processes_match_one_process_with_the_whole_batch(starter_tokenizer, tmp_path):
    batches = {case: (o, m, batch_for(o, m, starter_tokenizer, step=2)) for case, (o, m) in CASES.items()}
    torch.save(batches, tmp_path / "batches.pt")
    launch_two(str(REPO / "tests" / "_train_worker.py"), "--batches", str(tmp_path / "batches.pt"),
           "--tokenizer", starter_tokenizer, "--out", str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for case, (objective, modalities, batch) in batches.items():
        model = learner(objective, modalities, starter_tokenizer)
        loss = model(batch)["loss"]
        loss.backward()
        assert abs(two[case]["loss"] - loss.item()) < 1e-5, case
        one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert one.keys() == two[case]["grads"].keys(), case
        for name, g in one.items():
            assert torch.allclose(two[case]["grads"][name], g, rtol=1e-4, atol=1e-6), f"{case}: {name}"


@pytest.mark.slow
def test_a_recipe_runs_on_two_processes(tmp_path):
    """``accelerate launch -m pipeline.cli run``: process 0 alone trains the tokenizer, the other
    waits for it; both then train CLIP together, checkpoint and finish."""
    emoji = str(REPO / "data/starter/emoji/train")
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "patch_size": 4}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "two", "sources": {"emoji": {"shards": emoji, "modalities": ["image", "text"]}},
        "modalities": {"image": {"size": 16}, "text": {"tokenizer": "{run}/tokenize", "max_length": 24}},
        "stages": [{"name": "tokenize", "shards": [emoji], "vocab_size": 300},
                   {"name": "clip", "stage": "pretrain", "sources": ["emoji"], "objectives": {"clip": {}},
                    "steps": 4, "accumulate": 2, "checkpoint_every": 2, "encoders": {"image": tiny, "text": tiny},
                    "loader": {"batch_size": 8, "num_workers": 1, "ledger": str(tmp_path / "ledger")}}]}))
    launch_two("-m", "pipeline.cli", "run", str(recipe), "--runs", str(tmp_path / "runs"), cwd=tmp_path)
    out = tmp_path / "runs" / "two" / "clip"
    state = json.loads((out / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and [d["rank"] for d in state["data"]] == [0, 1]
    keys = ranks_keys(tmp_path / "ledger")
    assert len(keys[0]) == len(keys[1]) == 4 * 2 * 8 and not set(keys[0]) & set(keys[1])
    assert json.loads((out / "done.json").read_text())["summary"]["step"] == 4
    assert (out / "encoders" / "text" / "tokenizer.json").is_file() and (out / "encoders" / "image" / "config.json").is_file()


#: FSDP cases: the last layer at selected rows (data2vec: ViT, MLM: BERT), the EMA teacher (a
#: momentum of 0.5, so that its update shows), CLIP's micro-batch cache (``begin_step``) contrasting
#: across processes, MAE's decoder blocks
EMA = {"ema_start": 0.5, "ema_end": 0.5}
FSDP_CASES = {"mae-image": ("mae", ("image",), {}), "mlm-text": ("mlm", ("text",), {}),
              "data2vec-image": ("data2vec", ("image",), EMA), "data2vec-text": ("data2vec", ("text",), EMA),
              "clip-image-text": ("clip", ("image", "text"), {})}


def fsdp_config(out: Path) -> Path:
    """``accelerate_config.yaml`` with its FSDP block uncommented, for two CPU processes."""
    text = (REPO / "accelerate_config.yaml").read_text()
    block = [ln[2:] for ln in text.splitlines() if ln.startswith(("# fsdp_config:", "#   fsdp_"))]
    cfg = {**yaml.safe_load(text), **yaml.safe_load("\n".join(block)), "distributed_type": "FSDP",
           "num_processes": 2, "use_cpu": True}
    assert cfg["fsdp_config"]["fsdp_version"] == 2
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_fsdp_matches_one_process_with_the_whole_batch(starter_tokenizer, tmp_path):
    """Two processes under Accelerate's FSDP2, two micro-batches each, against one process running
    the four micro-batches: same loss, whole gradients, and whole weights after an optimizer step
    and the EMA update."""
    from _fsdp_worker import optimizer

    batches = {case: (o, m, extra, {**starter_batch(m, starter_tokenizer), "__step__": 2})
               for case, (o, m, extra) in FSDP_CASES.items()}
    torch.save(batches, tmp_path / "batches.pt")
    launch_two(str(REPO / "tests" / "_fsdp_worker.py"), "parity", "--batches", str(tmp_path / "batches.pt"),
               "--tokenizer", starter_tokenizer, "--out", str(tmp_path / "fsdp.pt"), config=fsdp_config(tmp_path / "fsdp.yaml"))
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    for case, (objective, modalities, extra, batch) in batches.items():
        model = learner(objective, modalities, starter_tokenizer, **extra)
        opt = optimizer(model)
        micro = split(batch, 4)
        model.begin_step(micro)
        losses = []
        for mb in micro:
            loss = model(mb)["loss"]
            (loss / len(micro)).backward()
            losses.append(loss.item())
        assert abs(fsdp[case]["loss"] - sum(losses) / len(losses)) < 1e-5, case
        one = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert one.keys() == fsdp[case]["grads"].keys(), case
        for name, g in one.items():
            assert torch.allclose(fsdp[case]["grads"][name], g, rtol=1e-4, atol=1e-6), f"{case}: grad {name}"
        opt.step()
        model.after_step(1, 10)
        weights = model.state_dict()
        assert weights.keys() == fsdp[case]["weights"].keys(), case
        for name, w in weights.items():
            assert torch.allclose(fsdp[case]["weights"][name], w, rtol=1e-4, atol=1e-5), f"{case}: weight {name}"


@pytest.mark.slow
def test_fsdp_checkpoints_resume_bitwise_and_export_stock_models(tmp_path):
    """``trainer.train`` under FSDP2 writes whole weights and optimizer state gathered from the
    shards; a run resumed from its step-2 checkpoint ends bit for bit where the straight run does,
    and the exported encoder loads with ``AutoModel``."""
    import shutil

    from conftest import image_shards
    from safetensors.torch import load_file
    from transformers import AutoModel

    shards = image_shards(tmp_path / "shards", n=64, per_shard=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = fsdp_config(tmp_path / "fsdp.yaml")
    launch_two(str(REPO / "tests" / "_fsdp_worker.py"), "train", "--shards", str(shards), "--out", str(straight),
               config=config)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    launch_two(str(REPO / "tests" / "_fsdp_worker.py"), "train", "--shards", str(shards), "--out", str(resumed),
               config=config)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(run / "checkpoints" / "step_00000004" / name) for run in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    weights = load_file(straight / "checkpoints" / "step_00000004" / "model.safetensors")
    assert any(k.endswith(".exp_avg") for k in load_file(straight / "checkpoints" / "step_00000004" / "optimizer.safetensors"))
    model = AutoModel.from_pretrained(straight / "encoders" / "image")
    exported = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    assert exported and all(torch.equal(v, weights[f"encoders.image.model.{k}"]) for k, v in exported.items())
