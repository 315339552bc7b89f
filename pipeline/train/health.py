"""Training health: catch divergence and collapse while they can still be acted on.

Watched every step: a non-finite loss (or gradient norm), and a finite loss that spikes far above
the median of the last healthy steps (``spike_factor``). Watched every ``every`` steps, on the
embeddings the objectives report: the standard deviation of the L2-normalized embedding per
dimension (→ 0 when every input maps to the same point, the collapse every self-supervised method
fears) and the effective rank of the batch of embeddings (exp of the entropy of the normalized
singular values, RankMe: → 1 when they span a single direction); data2vec's target variance (→ 0
when the teacher has collapsed) and CLIP's logit scale (non-finite, or above a bound if set).

What happens is configurable: ``warn`` logs and skips the bad step, ``stop`` ends the run with a
message naming the problem (the last good checkpoint stays), ``rollback`` reloads the last good
checkpoint, lowers the learning rate and goes on (at most ``max_rollbacks`` times, then stops).
"""

from __future__ import annotations

import collections
import math
import statistics
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.config import Config


class HealthConfig(Config):
    action: Literal["warn", "stop", "rollback"] = "rollback"
    #: steps between embedding checks (the loss is checked every step)
    every: int = Field(10, ge=1)
    #: collapse when the per-dimension std of normalized embeddings, × sqrt(width), falls below this
    #: (about 1 when spread evenly; early MLM passes through 1e-3 while all texts share one dominant
    #: direction yet still differ along ~50 others, so the bar is "identical up to rounding")
    min_std: float = Field(1e-4, ge=0)
    #: collapse when the effective rank of a batch of embeddings falls below this
    min_rank: float = Field(1.05, ge=0)
    #: collapse signals must hold at this many consecutive checks before the action is taken
    #: (early MLM, for one, briefly maps every text to nearly the same direction and recovers);
    #: a non-finite loss acts at once
    patience: int = Field(3, ge=1)
    #: data2vec: collapse when the teacher's target variance falls below this
    min_target_var: float = Field(1e-4, ge=0)
    #: CLIP: flag a logit scale above this (None: only a non-finite one)
    max_logit_scale: float | None = None
    #: a loss above this multiple of the median of the last ``spike_window`` healthy losses acts at
    #: once, like a non-finite one (None: never)
    spike_factor: float | None = Field(1000.0, gt=1)
    spike_window: int = Field(20, ge=3)
    #: rollback: learning-rate multiplier applied at each rollback, and how many are allowed
    lr_factor: float = Field(0.5, gt=0, le=1)
    max_rollbacks: int = Field(3, ge=0)


class HealthError(RuntimeError):
    """The run was stopped by the health monitor; the message says why and where to resume from."""


def embedding_stats(embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``health/<modality>/std`` and ``health/<modality>/rank`` of each [B, D] embedding batch."""
    out = {}
    for m, e in embeddings.items():
        if len(e) < 2:  # one sample has no spread to measure
            continue
        z = F.normalize(e.float(), dim=-1)
        out[f"health/{m}/std"] = z.std(0).mean() * math.sqrt(z.shape[-1])
        out[f"health/{m}/rank"] = effective_rank(z)
    return out


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalized singular values of the centered batch); 0 for a constant batch."""
    s = torch.linalg.svdvals(z - z.mean(0, keepdim=True))
    if s.sum() <= 1e-8 * max(1, z.shape[-1]):
        return z.new_tensor(0.0)
    p = s / s.sum()
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


class Monitor:
    """Checks every step's metrics: a non-finite value at once, collapse signals once they have held
    for ``patience`` checks in a row."""

    def __init__(self, cfg: HealthConfig):
        self.cfg, self.strikes = cfg, 0
        self.losses: collections.deque[float] = collections.deque(maxlen=cfg.spike_window)

    def check(self, metrics: dict[str, float]) -> str | None:
        """The problem to act on now, or None."""
        problem = nonfinite(metrics) or self.spike(metrics.get("loss"))
        if problem is not None:
            return problem
        if "loss" in metrics:
            self.losses.append(metrics["loss"])
        if not any(k.startswith("health/") for k in metrics):
            return None  # not a check step (every ``every`` steps): nothing to count
        problem = collapse(self.cfg, metrics)
        self.strikes = self.strikes + 1 if problem else 0
        if problem and self.strikes >= self.cfg.patience:
            self.strikes = 0
            return problem + (f" at {self.cfg.patience} checks in a row" if self.cfg.patience > 1 else "")
        return None


    def spike(self, loss: float | None) -> str | None:
        """A loss far above the recent ones (a finite divergence), as a sentence, or None."""
        if loss is None or self.cfg.spike_factor is None or len(self.losses) < 3:
            return None
        median = statistics.median(self.losses)
        if median > 0 and loss > self.cfg.spike_factor * median:
            return f"loss spiked: {loss:.4g} is {loss / median:.3g}× the median {median:.4g} of the last {len(self.losses)} steps"
        return None


def nonfinite(metrics: dict[str, float]) -> str | None:
    """The first NaN / inf among the metrics, as a sentence, or None."""
    for key in sorted(metrics, key=lambda k: k != "loss"):  # the loss first: it names the cause best
        if not math.isfinite(metrics[key]):
            return f"{key} is {metrics[key]}"
    return None


def collapse(cfg: HealthConfig, metrics: dict[str, float]) -> str | None:
    """The first collapse signal in a check step's (process-averaged) metrics, as a sentence, or None."""
    for key, value in metrics.items():
        if key.startswith("health/") and key.endswith("/std") and value < cfg.min_std:
            return f"embeddings collapsed: {key} = {value:.3g} < min_std {cfg.min_std}"
        if key.startswith("health/") and key.endswith("/rank") and value < cfg.min_rank:
            return f"embeddings collapsed: {key} = {value:.3g} < min_rank {cfg.min_rank}"
        if key.endswith("/target_var") and value < cfg.min_target_var:
            return f"teacher targets collapsed: {key} = {value:.3g} < min_target_var {cfg.min_target_var}"
        if key.endswith("/logit_scale") and cfg.max_logit_scale is not None and value > cfg.max_logit_scale:
            return f"{key} = {value:.3g} > max_logit_scale {cfg.max_logit_scale}"
    return None
