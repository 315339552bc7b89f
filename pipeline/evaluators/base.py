"""The evaluator contract: what goes in (``Features``), what comes out (``Metric``), and the one
piece of statistics every evaluator shares (``bootstrap`` intervals).

Evaluators are pure functions over arrays: encoders, shards and the command line are wired in by
the evaluate stage, so everything here runs on synthetic features in a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import Config

#: resampled means held in memory at once, bounded for 50k samples x 1000 replicates
_BOOT_CELLS = 1 << 22


class EvaluatorConfig(Config):
    """Base of each evaluator's settings (``evaluators: {knn: {...}}`` in an evaluate stage)."""


@dataclass
class Features:
    """Frozen features of one split.

    x: [N, D] float32; keys: N sample keys; labels: [N] int64 class ids, or None where the data has
    no classes; texts: the N paired captions (retrieval, zero-shot), or None.
    """

    x: np.ndarray
    keys: list[str]
    labels: np.ndarray | None = None
    texts: list[str] | None = None

    def __post_init__(self):
        self.x = np.asarray(self.x, dtype=np.float32)
        if self.x.ndim != 2:
            raise ValueError(f"features: x must be [N, D], got shape {self.x.shape}")
        n = len(self.x)
        if len(self.keys) != n:
            raise ValueError(f"features: {len(self.keys)} keys for {n} rows")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"features: labels must be [{n}], got shape {self.labels.shape}")
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"features: {len(self.texts)} texts for {n} rows")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx) -> Features:
        """The rows ``idx`` (integer indices or a boolean mask of length N), in that order."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Features(
            x=self.x[idx],
            keys=[self.keys[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            texts=None if self.texts is None else [self.texts[i] for i in idx],
        )


@dataclass
class Metric:
    """One number an evaluator measured.

    interval: 95 % bootstrap percentile interval of ``value``; chance: what a uniform guess scores on
    the same test set (None where no guess applies); n: test samples (queries for retrieval);
    extra: JSON-able details (per-class accuracy, confusion matrix, the chosen setting, ...).
    """

    task: str
    name: str
    value: float
    interval: tuple[float, float] | None
    chance: float | None
    n: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """A plain dict of Python numbers and lists (``json.dumps`` takes it as is)."""
        return {
            "task": self.task,
            "name": self.name,
            "value": float(self.value),
            "interval": None if self.interval is None else [float(v) for v in self.interval],
            "chance": None if self.chance is None else float(self.chance),
            "n": int(self.n),
            "extra": _plain(self.extra),
        }


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (nested in dicts and lists) as Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def bootstrap(per_sample: np.ndarray, seed: int = 0, n_boot: int = 1000, *, groups: np.ndarray | None = None,
              statistic: str = "mean") -> tuple[float, float]:
    """95 % percentile interval of a statistic of ``per_sample`` [N] (0/1 hits or scores).

    statistic: ``"mean"`` or ``"median"``. groups: [N] int ids; when given, the statistic is the
    mean over groups of each group's mean (mean per-class recall), recomputed on every resample.
    Replicates are drawn in blocks so memory stays bounded whatever N.
    """
    values = np.asarray(per_sample, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap: no samples")
    if statistic not in ("mean", "median"):
        raise ValueError(f"bootstrap: statistic must be 'mean' or 'median', got {statistic!r}")
    rng = np.random.default_rng(seed)
    block = max(1, _BOOT_CELLS // n)
    stats = []
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - start), n))  # [b, N]
        if groups is not None:
            stats.append(_group_means(values[idx], np.asarray(groups)[idx]))
        elif statistic == "median":
            stats.append(np.median(values[idx], axis=1))
        else:
            stats.append(values[idx].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(stats), [2.5, 97.5])
    return float(lo), float(hi)


def _group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """values, groups: [b, N] → [b] mean over the groups present in each row of each group's mean."""
    _, g = np.unique(groups, return_inverse=True)
    g = g.reshape(groups.shape)
    n_groups = int(g.max()) + 1
    flat = (np.arange(len(g))[:, None] * n_groups + g).ravel()  # one bin per (replicate, group)
    sums = np.bincount(flat, weights=values.ravel(), minlength=len(g) * n_groups).reshape(len(g), n_groups)
    counts = np.bincount(flat, minlength=len(g) * n_groups).reshape(len(g), n_groups)
    present = counts > 0
    means = np.where(present, sums / np.maximum(counts, 1), 0.0)
    return means.sum(axis=1) / present.sum(axis=1)


def class_index(train_labels: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sorted class ids seen in training, and each of ``others`` mapped to positions in it
    (-1 for a class the training split never shows: such a sample can never be predicted right)."""
    classes = np.unique(train_labels)
    mapped = []
    for labels in (train_labels, *others):
        pos = np.searchsorted(classes, labels)
        pos = np.minimum(pos, len(classes) - 1)
        mapped.append(np.where(classes[pos] == labels, pos, -1))
    return classes, mapped


def topk_hits(scores: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """scores: [B, C], target: [B] column index (-1: a class that cannot be predicted) → [B] float 0/1,
    1 where the target is among the k best. Ties count against the target, so a class that got no
    kNN vote is never a top-5 hit merely for tying with other unvoted classes."""
    safe = np.maximum(target, 0)
    own = scores[np.arange(len(scores)), safe][:, None]  # [B, 1]
    at_least = (scores >= own).sum(axis=1)  # the target and every class scoring as high or higher
    return ((at_least <= k) & (target >= 0)).astype(np.float64)
