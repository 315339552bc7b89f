"""Run by ``accelerate launch`` from tests/test_train_distributed.py, with the FSDP settings of
``accelerate_config.yaml``: one of two CPU processes training under Accelerate's FSDP2 (every
transformer layer its own sharded unit).

Accelerate turns FSDP on only for GPU-like device types; on CPU processes it starts as MULTI_CPU
even when launched with ``distributed_type: FSDP``. ``fsdp_accelerator`` sets the distributed type
after construction, and the rest is Accelerate's own FSDP2 code, with the plugin the launch's
settings give: ``prepare`` (``fully_shard`` per layer and at the root, the optimizer moved onto the
shards), ``no_sync``, ``clip_grad_norm_``, ``get_state_dict``.

    parity --batches F --tokenizer T --out O   one step of each case on this process's two
                                               micro-batches: loss, whole gradients, whole weights after
    train --shards D --out O --steps N          ``trainer.train`` (data2vec, 2 micro-batches a step),
                                               resuming from O's checkpoints, then ``pretrain.export``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_objectives import learner, split

from pipeline.train import checkpoint, sharding
from pipeline.train.loop import param_groups


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """The launch's FSDP settings (its ``FSDP_*`` environment). With TRANSFORMER_BASED_WRAP and no
    class list the plugin takes the first model's ``_no_split_modules`` and keeps them, so each
    learner here gets a fresh one."""
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None, "not the FSDP2 launch settings"
    return plugin


def fsdp_accelerator() -> Accelerator:
    acc = Accelerator(cpu=True)
    # the process state too: Accelerate copies it into the accelerator's state again in ``prepare``
    PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = fsdp_plugin()
    assert acc.is_fsdp2 and acc.num_processes == 2
    return acc


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with the trainer's parameter groups: the step shows the gradients as they are (Adam's
    normalization turns float noise on a gradient that is zero in exact arithmetic, such as a key
    bias's, into a full-size step)."""
    return torch.optim.SGD(param_groups(model, 0.05), lr=0.1)


def parity(args, acc: Accelerator) -> None:
    results = {}
    for case, (objective, modalities, extra, batch) in torch.load(args.batches, weights_only=True).items():
        model = learner(objective, modalities, args.tokenizer, **extra)
        acc.state.fsdp_plugin = fsdp_plugin()
        prepared, opt = acc.prepare(model, optimizer(model))
        assert isinstance(prepared, FSDPModule) and all(
            isinstance(layer, FSDPModule) for enc in model.encoders.values() for layer in enc.layers), case
        micro = split(batch, 4)[2 * acc.process_index: 2 * acc.process_index + 2]  # this process's half
        sharding.call_as(prepared, type(model).begin_step, micro)  # as the trainer calls it
        losses = []
        for i, mb in enumerate(micro):
            with acc.no_sync(prepared) if i < len(micro) - 1 else contextlib.nullcontext():
                loss = prepared(mb)["loss"]
                acc.backward(loss / len(micro))
            losses.append(loss.detach())
        grads = {n: sharding.full(p.grad) for n, p in prepared.named_parameters() if p.grad is not None}
        opt.step()
        model.after_step(1, 10)  # EMA teachers follow the updated shards
        weights, _ = checkpoint.gather(prepared, opt.optimizer)
        loss = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        results[case] = {"loss": loss, "grads": grads, "weights": weights}
    if acc.is_main_process:
        torch.save(results, args.out)
    acc.wait_for_everyone()


def train(args, acc: Accelerator) -> None:
    from modalities.image import ImageConfig
    from modalities.image import Modality as Image
    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
    from pipeline.encoders.base import EncoderConfig
    from pipeline.objectives import data2vec
    from pipeline.train.learner import Learner
    from pipeline.train.loop import TrainerConfig
    from pipeline.train.loop import train as run
    from stages.pretrain import export

    torch.manual_seed(0)
    image = Image(ImageConfig(size=16))
    encoders = {"image": image.encoder(EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, patch_size=4))}
    model = Learner(encoders, {"data2vec": data2vec.Objective(data2vec.Config(), encoders, "data2vec")})
    loader = StreamingLoader({"imgs": SourceConfig(shards=args.shards, modalities=["image"])},
                             LoaderConfig(batch_size=4, num_workers=0), {"image": image.cfg}, seed=0,
                             rank=acc.process_index, world_size=acc.num_processes)
    cfg = TrainerConfig(steps=args.steps, accumulate=2, checkpoint_every=2, keep_checkpoints=10, log_every=1)
    out = Path(args.out)
    run(model, loader, cfg, out, acc, progress=False)
    export(model, {"image": image}, {"data2vec": "data2vec"}, out, acc)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["parity", "train"])
    p.add_argument("--batches")
    p.add_argument("--tokenizer")
    p.add_argument("--shards")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    acc = fsdp_accelerator()
    (parity if args.mode == "parity" else train)(args, acc)


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()  # an open gloo group can abort the process at exit
