"""Run by ``accelerate launch`` from tests/test_train_distributed.py: one of two processes, each
with half of a fixed batch, computing loss and (DDP-averaged) gradients of each objective."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_objectives import learner, split


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", required=True, help="torch file: {case: (objective, modalities, batch)}")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    acc = Accelerator(cpu=True)
    results = {}
    for case, (objective, modalities, batch) in torch.load(args.batches, weights_only=True).items():
        model = learner(objective, modalities, args.tokenizer)
        ddp = acc.prepare(model)
        half = split(batch, acc.num_processes)[acc.process_index]
        loss = ddp(half)["loss"]
        loss.backward()  # DDP averages the gradients over the processes
        results[case] = {"loss": acc.reduce(loss.detach(), reduction="mean").item(),
                         "grads": {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}}
    if acc.is_main_process:
        torch.save(results, args.out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()  # an open gloo group can abort the process at exit
