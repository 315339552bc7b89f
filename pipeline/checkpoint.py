"""Checkpoints that carry everything needed to continue exactly, written atomically.

``<dir>/step_00000100/`` holds ``model.safetensors`` (every weight of the learner, EMA teachers
included), ``optimizer.safetensors`` (the optimizer's tensors, ``<parameter name>.<exp_avg|…>``)
and ``state.json`` (step, the rest of the optimizer state, learning-rate scale, each process's data
position and RNG states, the resolved config). Both hold whole tensors, whatever the sharding
(``gather`` / ``scatter``), so a run may resume on another number of processes. A checkpoint is assembled in a temporary directory and renamed into place, so a process
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
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

PREFIX = "step_"


def save(root: Path, step: int, model: dict[str, torch.Tensor], optimizer: dict, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` and delete all but the ``keep`` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, str(tmp / "model.safetensors"))
    tensors, rest = _split_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=1))
    if final.exists():  # the same step written again (after a rollback): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (temporary directories are never complete)."""
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model weights, optimizer state_dict, state) of checkpoint ``path``."""
    state = json.loads((path / "state.json").read_text())
    model = load_file(str(path / "model.safetensors"))
    optimizer = _join_optimizer(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
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
    when several processes run; with cpu offload only process 0 receives them (others: empty)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_available() and dist.is_initialized())
    return get_state_dict(model, optimizer, options=options)


def scatter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
            optimizer_state: dict) -> None:
    """Load what ``gather`` produced into ``model`` and ``optimizer``; each process hands over the
    whole state and keeps its part (its shard under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))


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
