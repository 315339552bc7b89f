"""Shared fixtures: tiny real shard sets written through the pipeline's own writer."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

from pipeline.data.writer import write_shards

REPO = Path(__file__).resolve().parent.parent
STARTER = REPO / "data" / "starter"


def png(seed: int, size: int = 12, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3 if mode == "RGB" else 1), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr).save(buf, format="PNG")
    return buf.getvalue()


def image_shards(out: Path, n: int = 120, per_shard: int = 10, compress: bool = False) -> Path:
    """``n`` labelled RGB images, keys ``s00000`` …, in shards of ``per_shard``."""
    write_shards(list(range(n)), lambda i: {"__key__": f"s{i:05d}", "png": png(i), "cls": str(i % 4).encode(),
                                            "json": json.dumps({"i": i}).encode()},
                 out, max_count=per_shard, compress=compress, workers=1, progress=False)
    return out


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return image_shards(tmp_path / "shards")


@pytest.fixture(scope="session")
def starter_tokenizer(tmp_path_factory) -> str:
    """A small WordPiece vocabulary trained on starter texts (the test splits: quick to read)."""
    from pipeline.stage import Context
    from stages import tokenize

    out = tmp_path_factory.mktemp("tokenizer")
    shards = [str(STARTER / name / "test") for name in ("wordnet", "emoji", "speech")]
    tokenize.run(tokenize.Config(shards=shards, vocab_size=2000), Context(out_dir=out, progress=False))
    return str(out)


def launch_two(*args: str, cwd: Path | None = None, config: Path | None = None) -> str:
    """``accelerate launch`` of two real CPU processes (``--cpu`` alone would start only one) running
    ``args`` (a script and its arguments, or ``-m module ...``); returns their stdout. ``config``:
    an Accelerate config file for two CPU processes to launch with instead of the flags."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    how = ["--config_file", str(config)] if config else [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ranks_keys(ledger: Path) -> dict[int, list[str]]:
    """Every sample key a loader's ledger recorded, per process rank, in consumption order."""
    return {int(f.stem[4:]): [k for ln in f.read_text().splitlines() for k in json.loads(ln)["keys"]]
            for f in sorted(ledger.glob("rank*.jsonl"))}


#: a one-layer encoder, for tests that train
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "patch_size": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """96 labelled 12-px images in 8 shards, shared by the tests of one module."""
    return image_shards(tmp_path_factory.mktemp("train") / "shards", n=96, per_shard=12)


def tiny_mae(data: Path, seed: int = 0):
    """A one-layer ViT with MAE on ``data`` (the ``data`` fixture) and its loader: (learner, loader)."""
    import torch

    from modalities.image import ImageConfig
    from modalities.image import Modality as Image
    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
    from pipeline.encoders.base import EncoderConfig
    from pipeline.objectives import mae
    from pipeline.train.learner import Learner

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


def trainer_cfg(action: str, **kw):
    """8 steps, a checkpoint every 2, health checked every step with ``action``."""
    from pipeline.train.health import HealthConfig
    from pipeline.train.loop import OptimConfig, TrainerConfig

    return TrainerConfig(steps=8, checkpoint_every=2, log_every=1, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                         health=HealthConfig(action=action, every=1, **kw))
