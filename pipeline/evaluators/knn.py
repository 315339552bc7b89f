"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

Features are L2-normalized; each test row's k most cosine-similar training rows vote for their
class with weight exp(similarity / temperature), and the class with the largest summed vote wins.
Similarities are computed a block of test rows at a time, so 50k x 50k never sits in memory.

Chance is 1 / C for top-1 and min(5, C) / C for top-5, C the number of classes seen in training:
what a uniform guess scores (the share of the most frequent class is reported in ``extra``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipeline.evaluators.base import EvaluatorConfig, Features, Metric, bootstrap, class_index, topk_hits

TASK = "knn"
#: similarity cells per block of test rows (x 4 bytes: 64 MB)
_BLOCK_CELLS = 1 << 24


class Config(EvaluatorConfig):
    #: neighbours that vote (capped at the number of training rows)
    k: int = Field(20, ge=1)
    #: softness of the vote weights exp(sim / temperature)
    temperature: float = Field(0.07, gt=0)


def evaluate(cfg: Config, train: Features, test: Features) -> list[Metric]:
    """Top-1 (and top-5 when there are at least 5 classes and 5 neighbours) accuracy on ``test``."""
    if train.labels is None or test.labels is None:
        raise ValueError("knn: train and test features need labels")
    if train.x.shape[1] != test.x.shape[1]:
        raise ValueError(f"knn: train features are {train.x.shape[1]}-d, test features {test.x.shape[1]}-d")
    classes, (train_y, test_y) = class_index(train.labels, test.labels)
    votes = class_votes(_normalize(train.x), train_y, _normalize(test.x), len(classes), cfg.k, cfg.temperature)
    k = min(cfg.k, len(train))
    c = len(classes)
    extra = {"k": k, "temperature": cfg.temperature, "classes": c,
             "majority_share": float(np.bincount(train_y).max() / len(train_y))}
    metrics = []
    for top in (1, 5):
        if top == 5 and (c < 5 or k < 5):  # fewer classes or voters than 5: top-5 says nothing
            continue
        hits = topk_hits(votes, test_y, top)
        metrics.append(Metric(TASK, f"top{top}", float(hits.mean()), bootstrap(hits), min(top, c) / c,
                              len(test), dict(extra)))
    return metrics


def class_votes(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int,
                temperature: float) -> np.ndarray:
    """Normalized train_x [N, D], class positions train_y [N], normalized test_x [M, D] → votes [M, C]."""
    k = min(k, len(train_x))
    block = max(1, _BLOCK_CELLS // len(train_x))
    out = np.empty((len(test_x), n_classes), dtype=np.float64)
    for start in range(0, len(test_x), block):
        sim = test_x[start:start + block] @ train_x.T  # [b, N]
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.broadcast_to(
            np.arange(sim.shape[1]), sim.shape)
        weight = np.exp(np.take_along_axis(sim, nn, axis=1).astype(np.float64) / temperature)  # [b, k]
        rows = np.arange(len(sim))[:, None] * n_classes
        flat = (rows + train_y[nn]).ravel()  # one bin per (test row, class)
        out[start:start + len(sim)] = np.bincount(flat, weights=weight.ravel(),
                                                  minlength=len(sim) * n_classes).reshape(len(sim), n_classes)
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
