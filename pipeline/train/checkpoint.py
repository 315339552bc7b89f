"""Checkpoints that carry everything needed to continue exactly, written atomically.

``<dir>/step_00000100/`` holds ``model.safetensors`` (every weight of the learner, EMA teachers
included), ``optimizer.safetensors`` (the optimizer's tensors, ``<parameter name>.<exp_avg|…>``)
and ``state.json`` (step, the rest of the optimizer state, learning-rate scale, each process's data
position and RNG states, the resolved config). Both hold whole tensors, whatever the sharding
(``gather`` / ``scatter``), so a run may resume on another number of processes. A checkpoint is
assembled in a temporary directory and renamed into place, so a process killed at any moment
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError
from pipeline.train import sharding

PREFIX = "step_"


#: test-only switch: ``<point>@<step>`` kills this process (SIGKILL) at that point of writing that
#: checkpoint, so fault-injection tests stop the writer deterministically
FAULT_ENV = "SELFSUP_CHECKPOINT_FAULT"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written (full disk) or read (truncated, corrupt)."""


def save(root: Path, step: int, model: dict[str, torch.Tensor], optimizer: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` and delete all but the ``keep`` newest. The stage
    directory is locked, so temporary directories left by earlier writers are stale: removed."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / "model.safetensors"))
        _fault("model", step)
        tensors, rest = _split_optimizer(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _fault("optimizer", step)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=1))
        _fault("state", step)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: checkpoint not written: {e.strerror or e} (the previous one is intact)") from None
    if final.exists():  # the same step written again (after a rollback): the new one replaces it
        aside = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fault("renamed", step)
    for old in candidates(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first (temporary directories are never complete)."""
    done = [p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(done, reverse=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``."""
    found = candidates(root)
    return found[0] if found else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model weights, optimizer state_dict, state) of checkpoint ``path``; a file that does not
    read back (truncated, corrupt) is a ``CheckpointError`` naming it."""
    file = path / "state.json"
    try:
        state = json.loads(file.read_text())
        file = path / "model.safetensors"
        model = load_file(str(file))
        file = path / "optimizer.safetensors"
        optimizer = _join_optimizer(load_file(str(file)), state.pop("optimizer"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # safetensors raises its own errors as these
        raise CheckpointError(f"{file}: unreadable ({' '.join(str(e).split())[:200]})") from None
    except Exception as e:  # safetensors_rust.SafetensorError derives from Exception only
        if type(e).__name__ != "SafetensorError":
            raise
        raise CheckpointError(f"{file}: unreadable ({' '.join(str(e).split())[:200]})") from None
    return model, optimizer, state


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        param, name = flat.rsplit(".", 1)  # parameter name, state name (exp_avg, step …)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, optimizer state_dict) of the whole model, keyed by parameter name, in host memory:
    gathered from every process's shard under FSDP, without DDP's ``module.`` prefix. A collective
    when several processes run; only process 0 keeps the result then (others: empty)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    several = dist.is_available() and dist.is_initialized()
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=several))
    keep = not several or dist.get_rank() == 0
    # the optimizer by hand: torch's helper would first give an optimizer without state a step
    # with zero gradients (state step 1, zero moments), changing the next real update
    names = _names(model)
    sd = optimizer.state_dict()  # state keyed by position over the groups' parameters
    order = [names[id(p)] for p in _order(optimizer)]
    state = {}
    for i, entries in sorted(sd["state"].items()):
        whole = {k: _whole(v) for k, v in entries.items()}  # every process takes part in each gather
        if keep:
            state[order[i]] = whole
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return weights, ({"state": state, "param_groups": groups} if keep else {})


def scatter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
            optimizer_state: dict) -> None:
    """Load what ``gather`` produced into ``model`` and ``optimizer``: each process hands over the
    whole state and keeps its part (its shard under FSDP). Parameters the checkpoint holds no
    optimizer state for (no gradient yet when it was written) start without state, as then."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    missing = sorted(set(_module(model).state_dict()) - set(weights))  # torch's loader would keep them as they are
    if missing:
        raise ConfigError(f"no weight {missing[0]} ({len(missing)} missing): a checkpoint of another model?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    params = dict(_module(model).named_parameters())
    saved = optimizer_state["state"]
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ConfigError(f"optimizer state for {unknown[0]}, which this model does not have ({len(unknown)} "
                          f"such): a checkpoint of another model?")
    if len(optimizer_state["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError(f"optimizer state with {len(optimizer_state['param_groups'])} parameter groups, "
                          f"this optimizer has {len(optimizer.param_groups)}")
    position = {id(p): i for i, p in enumerate(_order(optimizer))}
    state = {position[id(params[n])]: {k: _part(v, params[n]) for k, v in s.items()} for n, s in saved.items()}
    # hyperparameters from the checkpoint, parameters in this optimizer's order (positions map to themselves)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [position[id(p)] for p in now["params"]]}
              for g, now in zip(optimizer_state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _module(model: torch.nn.Module) -> torch.nn.Module:
    """The model DDP wraps (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in _module(model).named_parameters()}


def _order(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its state_dict numbers them."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _whole(value):
    """A tensor of optimizer state, whole and in host memory (gathered if it is a shard)."""
    return sharding.full(value).detach().cpu() if isinstance(value, torch.Tensor) else value


def _part(value, param: torch.Tensor):
    """Optimizer state for ``param`` as it lives beside it: this process's shard of a whole tensor
    under FSDP (every process holds the whole, so no data moves)."""
    if isinstance(value, torch.Tensor) and hasattr(param, "device_mesh") and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def rng_state() -> dict:
    """This process's random generators (python, torch CPU and, if used, its accelerator device)."""
    out = {"python": _b64(repr(random.getstate()).encode()), "torch": _b64(torch.get_rng_state().numpy().tobytes())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return out


def set_rng_state(saved: dict) -> None:
    import ast

    random.setstate(ast.literal_eval(base64.b64decode(saved["python"]).decode()))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(saved["torch"])), dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(saved["cuda"])), dtype=torch.uint8))


def nonfinite(model: dict[str, torch.Tensor]) -> str | None:
    """The name of the first weight holding NaN or inf, or None."""
    for name, t in model.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
