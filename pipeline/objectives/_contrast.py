"""What the contrastive objectives (CLIP, joint) share: every sample of the optimizer step is a
negative, whatever the number of processes and accumulated micro-batches.

Across processes, features are gathered with their gradient (each process scores its own rows
against the global batch; DDP's gradient average then gives the gradient of the whole batch).
Across micro-batches, ``StepFeatures`` embeds every micro-batch of the step without gradient in
``begin_step``; micro-batch i then recomputes its own features with gradient and is scored against
the cached features of all the others. Summed over the micro-batches this is exactly the gradient
of one big batch (each sample's features get their gradient in the one pass where they are live),
at the cost of one extra forward without gradient. Exactly so with encoder ``dropout: 0``: with
dropout, the cached pass and the live one draw different masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepFeatures:
    """Features of the micro-batches of one optimizer step, by micro-batch (its source and keys)."""

    def __init__(self):
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self._order: list[tuple] = []

    def begin(self, micro_batches: list[dict], features: Callable[[dict], dict[str, torch.Tensor]]) -> None:
        """Cache ``features(mb)`` of every micro-batch when there are several (one needs no cache)."""
        self._cache, self._order = {}, []
        if len(micro_batches) > 1:
            for mb in micro_batches:
                key = batch_id(mb)
                if key in self._cache:  # the live pass could not tell which of the two it is
                    raise ValueError(f"two micro-batches of one step hold the same samples {key[1][:3]}…; "
                                     "contrastive objectives need distinct micro-batches (more samples per source)")
                self._order.append(key)
                self._cache[key] = features(mb)

    def whole(self, batch: dict, live: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, int, bool]:
        """(features of the whole step with ``batch``'s replaced by ``live``, micro-batches k, the
        row where ``batch``'s start, whether ``batch`` is the step's last). A batch that was not
        cached (one micro-batch) is the whole step."""
        key = batch_id(batch)
        if key not in self._cache:
            return live, 1, 0, True
        i = self._order.index(key)
        feats = {name: torch.cat([self._cache[o][name] if o != key else live[name] for o in self._order])
                 for name in live}
        start = sum(len(next(iter(self._cache[o].values()))) for o in self._order[:i])
        return feats, len(self._order), start, i == len(self._order) - 1


def k_fold(loss: torch.Tensor, k: int) -> torch.Tensor:
    """The trainer averages the k micro-batch losses; the live features' share of the big batch's
    gradient is k times that average's: same value, k-fold gradient."""
    return loss if k == 1 else k * loss - (k - 1) * loss.detach()


def batch_id(batch: dict) -> tuple:
    return batch.get("__source__"), tuple(batch["__key__"])


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of every process concatenated in rank order, with gradient; offset of this process's
    rows). One process: ``x`` itself. Every process must hold as many rows."""
    rank, size = world()
    if size == 1:
        return x, 0
    import torch.distributed.nn as dist_nn

    return torch.cat(dist_nn.all_gather(x)), rank * len(x)
