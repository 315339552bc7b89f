"""Run by ``accelerate launch`` from tests/test_distributed.py: one process of a real multi-process job.

Each process streams its share of a shard set for one epoch (optionally resuming from saved loader
positions), writes the ledger, and checks with a collective that the processes together saw the
whole epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modalities.image import ImageConfig
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--resume", help="json list of every earlier rank's loader state")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    acc = Accelerator(cpu=True)
    loader = StreamingLoader({"imgs": SourceConfig(shards=args.shards, modalities=["image"], label="cls")},
                             LoaderConfig(batch_size=8, num_workers=args.workers, epochs=1, ledger=args.ledger),
                             {"image": ImageConfig(size=8)}, seed=11, rank=acc.process_index,
                             world_size=acc.num_processes)
    if args.resume:
        loader.load_state_dict(json.loads(Path(args.resume).read_text()))
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 8, 8)
        seen += len(batch["__key__"])
    total = acc.reduce(torch.tensor([seen]), reduction="sum").item()
    if acc.is_main_process:
        print(f"world={acc.num_processes} total={total}", flush=True)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main()
    torch.distributed.destroy_process_group()  # an open gloo group can abort the process at exit
