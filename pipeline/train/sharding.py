"""What sharded training (FSDP2 through Accelerate) asks of code that is not a plain ``forward``.

FSDP2 gathers a unit's weights in hooks around a *call* of the module and frees them after. Two
places here call around that: an encoder's last layer at selected rows reads the stock layer's
submodules directly, and ``Learner.begin_step`` runs encoders before the step's first forward.
``call_as`` runs such code inside the unit's hooks. ``full`` turns a replicated distributed tensor
(FSDP's gradient norm) into a plain one, ``shard`` gives this process's part of a sharded one.

With ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` and no class list, Accelerate shards each
transformer layer the ``Learner`` names in ``_no_split_modules``; other wrap policies may make a
unit of a module whose submodules an encoder calls directly, which these hooks do not cover.
"""

from __future__ import annotations

import torch
from torch import nn


def call_as(module: nn.Module, fn, *args):
    """``fn(module, *args)``, run as a call of ``module`` would be: for an FSDP2 unit, its weights
    are gathered before and freed after, and its gradients reduced in backward. ``fn`` becomes a
    registered forward method of that module the first time a sharded one is met (bound to that
    module: a copy of it made afterwards would run the original's weights, so copy before sharding,
    as the data2vec teacher is copied when the objective is built)."""
    if not torch.distributed.is_available():  # a torch build without distributed has no FSDP either
        return fn(module, *args)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(module, FSDPModule):
        return fn(module, *args)
    name = f"_selfsup_{fn.__name__}"
    if name not in module.__dict__:
        setattr(module, name, fn.__get__(module))  # fn bound to the module, then wrapped in FSDP's hooks
        register_fsdp_forward_method(module, name)
    return getattr(module, name)(*args)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a distributed tensor (a collective for a sharded one); ``t`` otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a distributed tensor (FSDP's parameters); ``t`` otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t
