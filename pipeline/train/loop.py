"""The one training loop: batches → learner → loss → backward → step, under Accelerate.

Read ``train`` top to bottom. Nothing in it knows which objectives run: the ``Learner`` sums their
losses, ``begin_step`` lets an objective see all micro-batches of a step first (CLIP negatives under
accumulation) and ``after_step`` updates what the optimizer does not (EMA teachers). Accelerate
places the model, runs DDP/FSDP and mixed precision as ``accelerate_config.yaml`` says; gradient
accumulation is explicit (``accumulate`` micro-batches, gradients synchronized on the last).

The learning rate is a pure function of the step (linear warmup, cosine decay). Checkpoints
(``pipeline.train.checkpoint``) carry weights, optimizer, step, each process's data position and RNG, so
a killed run continues where its last checkpoint was, with the same remaining samples and the same
final weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.data.batch import STEP
from pipeline.data.loader import to_device
from pipeline.train import checkpoint, sharding
from pipeline.train.health import HealthConfig, HealthError, Monitor, embedding_stats

log = logging.getLogger("selfsup.trainer")


class OptimConfig(Config):
    #: peak learning rate (after warmup)
    lr: float = Field(1e-3, gt=0)
    #: AdamW decoupled weight decay, applied to the weight matrices of linear and convolution layers only
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    #: linear warmup length (default: 5 % of the steps)
    warmup_steps: int | None = Field(None, ge=0)
    #: the cosine ends at ``lr × final_lr_ratio``
    final_lr_ratio: float = Field(0.0, ge=0, le=1)
    #: clip the global gradient norm to this (None: no clipping)
    grad_clip: float | None = Field(1.0, gt=0)


class TrainerConfig(Config):
    #: optimizer steps (each of ``accumulate`` micro-batches per process)
    steps: int = Field(1000, ge=1)
    accumulate: int = Field(1, ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


def lr_at(step: int, cfg: OptimConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: warmup, then cosine."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear / convolution / attention projections; none on
    norms, biases, embeddings, position and special tokens, or the CLIP temperature."""
    decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            decay.add(id(module.weight))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            decay.add(id(module.in_proj_weight))
    params = [p for p in model.parameters() if p.requires_grad]
    # layer-wise lr decay: a module may scale some parameters' learning rate (``lr_scales``: id → scale)
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    groups: dict[tuple[bool, float], list] = {}
    for p in params:
        groups.setdefault((id(p) in decay, scales.get(id(p), 1.0)), []).append(p)
    if not scales:  # the two groups of old, also when one is empty (checkpoints hold their layout)
        return [{"params": groups.get((True, 1.0), []), "weight_decay": weight_decay},
                {"params": groups.get((False, 1.0), []), "weight_decay": 0.0}]
    return [{"params": ps, "weight_decay": weight_decay if d else 0.0, "lr_scale": scale}
            for (d, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def train(learner, loader, cfg: TrainerConfig, out_dir: Path, accelerator, resolved: dict | None = None,
          progress: bool = True, probe=None) -> dict:
    """Train ``learner`` on ``loader`` for ``cfg.steps`` optimizer steps, resuming from the newest
    checkpoint in ``out_dir/checkpoints``. Returns a summary (final step, last metrics). ``probe``
    (``pipeline.train.probe.OnlineKnn``): measured when ``probe.due(step)``, logged with that step."""
    ckpt_dir, k = out_dir / "checkpoints", cfg.accumulate
    opt = torch.optim.AdamW(param_groups(learner, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    model, opt = accelerator.prepare(learner, opt)
    run = {"step": 0, "lr_scale": 1.0, "rollbacks": 0}
    if (resumed := restore_newest(ckpt_dir, model, opt, loader, accelerator)) is not None:
        run = resumed
    elif cfg.health.action == "rollback":  # something to roll back to before the first checkpoint
        save(ckpt_dir, run, model, opt, loader, accelerator, cfg, resolved)
    logger = MetricsLog(out_dir, accelerator.is_main_process, after=run["step"])
    batches = iter(loader)
    bar = _bar(cfg.steps, run["step"], progress and accelerator.is_main_process)
    model.train()
    metrics: dict[str, float] = {}
    monitor = Monitor(cfg.health)
    t0, seen = time.time(), 0
    while run["step"] < cfg.steps:
        step = run["step"]
        lr = lr_at(step, cfg.optim, cfg.steps) * run["lr_scale"]
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        micro = [{**to_device(next(batches), accelerator.device), STEP: step} for _ in range(k)]
        # objectives that couple micro-batches (CLIP) embed them all first (as a call of the
        # model: under FSDP, weights are gathered only around calls)
        with accelerator.autocast():  # Accelerate autocasts ``forward`` only
            sharding.call_as(learner, type(learner).begin_step, micro)
        sums: dict[str, torch.Tensor] = {}
        check = (step + 1) % cfg.health.every == 0
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if i == k - 1 else accelerator.no_sync(model)
            with sync:
                out = model(mb)
                accelerator.backward(out["loss"] / k)
            stats = {"loss": out["loss"].detach(), **out["metrics"], **(embedding_stats(out["embeddings"]) if check else {})}
            for key, v in stats.items():
                sums[key] = sums.get(key, 0) + v.float() / k
            seen += len(mb["__key__"])
        if cfg.optim.grad_clip is not None:
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            sums["grad_norm"] = sharding.full(norm).detach().float()
        # one host sync per step: the health check must see the loss before the step applies it,
        # and every process must decide alike
        step_metrics = _mean_over_processes(sums, accelerator)
        problem = monitor.check(step_metrics)
        if problem is not None:
            run, batches = _unhealthy(problem, step + 1, run, cfg, ckpt_dir, model, opt, loader, accelerator, batches)
            bar.n = run["step"]
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        run["step"] = step = step + 1
        learner.after_step(step, cfg.steps)
        metrics = {**step_metrics, "lr": lr}
        probed = probe is not None and probe.due(step)
        if probed:  # every process measures alike (an FSDP encoder needs all of them)
            metrics.update(probe(learner, accelerator.device))
        if step % cfg.log_every == 0 or step == cfg.steps or probed:
            rate = seen * accelerator.num_processes / max(1e-9, time.time() - t0)
            logger.write(step, {**metrics, "samples_per_s": rate})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.0f}", refresh=False)
            t0, seen = time.time(), 0
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save(ckpt_dir, run, model, opt, loader, accelerator, cfg, resolved)
    bar.close()
    logger.close()
    return {"step": run["step"], "rollbacks": run["rollbacks"], **{key: _short(v) for key, v in metrics.items()}}


def _unhealthy(problem, step, run, cfg, ckpt_dir, model, opt, loader, accelerator, batches):
    """Apply the configured action to an unhealthy step (its gradients are never applied)."""
    opt.zero_grad(set_to_none=True)
    action = cfg.health.action
    if action == "rollback" and run["rollbacks"] >= cfg.health.max_rollbacks:
        action = "stop"
        problem += f" (after {run['rollbacks']} rollbacks)"
    if action == "warn":
        log.warning("step %d: %s; step skipped", step, problem)
        run["step"] = step
        return run, batches
    last = checkpoint.latest(ckpt_dir)
    if action == "stop" or last is None:
        raise HealthError(f"step {step}: {problem}; stopped, last good checkpoint: {last or 'none'}")
    factor = run["lr_scale"] * cfg.health.lr_factor
    log.warning("step %d: %s; rolling back to %s with learning rate × %.3g", step, problem, last.name, factor)
    batches.close()  # its workers stop; the data position comes back from the checkpoint
    rollbacks = run["rollbacks"] + 1
    run = restore_newest(ckpt_dir, model, opt, loader, accelerator)
    run.update(lr_scale=factor, rollbacks=rollbacks)
    return run, iter(loader)


def save(ckpt_dir: Path, run: dict, model, opt, loader, accelerator, cfg: TrainerConfig, resolved) -> None:
    """Checkpoint the current step: every process contributes its data position and RNG state, and
    its part of the weights and optimizer state under FSDP; the main process writes. Weights holding
    NaN/inf are never written. ``model`` is the prepared learner."""
    from accelerate.utils import gather_object

    # every process checks what it holds (its shard under FSDP) and every process stops alike
    local = {k: sharding.shard(v) for k, v in accelerator.unwrap_model(model).state_dict().items()}
    bad = next((b for b in gather_object([checkpoint.nonfinite(local)]) if b is not None), None)
    if bad is not None:
        raise HealthError(f"step {run['step']}: weight {bad} is not finite; checkpoint not written")
    per_rank = gather_object([{"data": loader.state_dict(), "rng": checkpoint.rng_state()}])
    weights, optimizer = checkpoint.gather(model, opt.optimizer)
    if accelerator.is_main_process:
        state = {**run, "data": [r["data"] for r in per_rank], "rng": [r["rng"] for r in per_rank],
                 "world_size": accelerator.num_processes, "config": resolved or {}}
        checkpoint.save(ckpt_dir, run["step"], weights, optimizer, state, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def restore_newest(ckpt_dir: Path, model, opt, loader, accelerator) -> dict | None:
    """Restore the newest checkpoint under ``ckpt_dir`` that reads back, saying which ones were
    skipped and why; None when there is none. Every process reads the same files, so all skip alike."""
    found = checkpoint.candidates(ckpt_dir)
    for path in found:
        try:
            run = restore(path, model, opt, loader, accelerator)
        except checkpoint.CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)
            continue
        log.info("resumed from %s", path)
        return run
    if found:
        raise checkpoint.CheckpointError(f"{ckpt_dir}: none of {len(found)} checkpoints reads back; "
                                         f"move the directory aside to start over")
    return None


def restore(path: Path, model, opt, loader, accelerator) -> dict:
    """Load checkpoint ``path`` into the (prepared) model, optimizer, loader and RNG; returns the run state."""
    weights, optimizer, state = checkpoint.load(path)
    try:
        checkpoint.scatter(model, opt.optimizer, weights, optimizer)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except RuntimeError as e:  # load_state_dict's missing / unexpected / mis-shaped weights, on one line
        if "state_dict" not in str(e):
            raise
        raise ConfigError(f"{path}: {' '.join(str(e).split())[:500]}") from None
    loader.load_state_dict(state["data"])
    if state.get("world_size") == accelerator.num_processes:  # elastic resume keeps fresh generators
        checkpoint.set_rng_state(state["rng"][accelerator.process_index])
    return {k: state[k] for k in ("step", "lr_scale", "rollbacks")}


def _mean_over_processes(values: dict[str, torch.Tensor], accelerator) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[key].reshape(()) for key in keys])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(keys, stacked.tolist()))


class MetricsLog:
    """Metrics to ``metrics.jsonl`` and TensorBoard (``tensorboard --logdir <stage dir>/tb``)."""

    def __init__(self, out_dir: Path, enabled: bool, after: int = 0):
        """``after``: the step the run resumes from; rows of later steps (written before the
        interruption, about to be trained again) are dropped, so each step appears once."""
        path = out_dir / "metrics.jsonl"
        if enabled and path.is_file():
            rows = [ln for ln in path.read_text().splitlines() if ln.strip() and _step(ln) <= after]
            path.write_text("".join(r + "\n" for r in rows))
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 (closed by close())
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **{k: _short(v) for k, v in metrics.items()}}) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tb.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed run: dropped


def _short(value: float) -> float:
    """Six significant digits: readable logs that keep small learning rates meaningful."""
    return float(f"{value:.6g}")


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
