"""Linear probe: multinomial logistic regression on frozen, standardized features.

The inverse regularization strength C is chosen on a validation split carved from the training
features only: within each class, the rows whose key hashes lowest (a stable hash, seeded) are held
out, so the split is the same on every machine and whatever the row order. The probe is then refit
on the whole training split with the chosen C and scored once on the test split, which takes no
part in the choice. Standardization is fit on whichever rows the probe is fit on.
"""

from __future__ import annotations

import hashlib
import time
import warnings

import numpy as np
from pydantic import Field
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.evaluators.base import EvaluatorConfig, Features, Metric, bootstrap

TASK = "linear_probe"


class Config(EvaluatorConfig):
    #: inverse regularization strengths tried on the validation split (a log grid)
    Cs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], min_length=1)
    #: share of each class's training rows held out to choose C
    val_fraction: float = Field(0.2, gt=0, lt=1)
    #: L-BFGS iterations per fit (a cap: probes on frozen features converge in far fewer)
    max_iter: int = Field(1000, ge=1)
    #: L-BFGS stopping tolerance
    tol: float = Field(1e-4, gt=0)
    #: salts the key hash that picks the validation rows
    seed: int = 0


def evaluate(cfg: Config, train: Features, test: Features) -> list[Metric]:
    """Top-1 accuracy on ``test`` of the probe refit on all of ``train`` with the C chosen on it."""
    if train.labels is None or test.labels is None:
        raise ValueError("linear_probe: train and test features need labels")
    if len(np.unique(train.labels)) < 2:
        raise ValueError("linear_probe: the training split has a single class; a probe needs two or more")
    start = time.perf_counter()
    val_acc = select_c(cfg, train)
    best_c = max(val_acc, key=lambda c: (val_acc[c], -c))  # ties go to the stronger regularization
    probe = _fit(_probe(cfg, best_c), train.x, train.labels)
    pred = probe.predict(test.x)
    hits = (pred == test.labels).astype(np.float64)
    labels = np.union1d(train.labels, test.labels)
    confusion = confusion_matrix(test.labels, pred, labels=labels)  # rows: true class, columns: predicted
    per_class = {int(c): float(hits[test.labels == c].mean()) for c in np.unique(test.labels)}
    extra = {"C": best_c, "val_accuracy": {str(c): a for c, a in val_acc.items()}, "per_class_accuracy": per_class,
             "labels": labels.tolist(), "confusion": confusion.tolist(), "fit_seconds": time.perf_counter() - start}
    c = len(np.unique(train.labels))
    return [Metric(TASK, "top1", float(hits.mean()), bootstrap(hits), 1.0 / c, len(test), extra)]


def select_c(cfg: Config, train: Features) -> dict[float, float]:
    """Validation accuracy of each C in ``cfg.Cs``, from probes fit on the training rows outside the
    validation split. Fits run from the strongest regularization up, each starting from the last."""
    is_val = validation_mask(train.keys, train.labels, cfg.val_fraction, cfg.seed)
    fit_x, fit_y = train.x[~is_val], train.labels[~is_val]
    val_x, val_y = train.x[is_val], train.labels[is_val]
    if len(np.unique(fit_y)) < 2 or len(val_y) == 0:
        raise ValueError(f"linear_probe: val_fraction={cfg.val_fraction} leaves too few training rows to choose C")
    probe = _probe(cfg, min(cfg.Cs))
    accuracy = {}
    for c in sorted(cfg.Cs):
        _fit(probe.set_params(classifier__C=c), fit_x, fit_y)  # warm start: begins at the last C's solution
        accuracy[float(c)] = float((probe.predict(val_x) == val_y).mean())
    return accuracy


def validation_mask(keys: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """[N] bool: in every class with two or more rows, the ``round(fraction * n)`` rows (at least one)
    whose salted key hash is smallest. Depends on keys and labels only, never on row order."""
    digest = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest(), "big")
                       for k in keys], dtype=np.uint64)
    mask = np.zeros(len(keys), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:  # a single example stays in the fit split, or its class could not be learned
            continue
        take = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        mask[rows[np.argsort(digest[rows], kind="stable")[:take]]] = True
    return mask


def _probe(cfg: Config, c: float) -> Pipeline:
    """Standardization + multinomial logistic regression (lbfgs); warm-started when refit."""
    classifier = LogisticRegression(C=c, max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True)
    return Pipeline([("scale", StandardScaler()), ("classifier", classifier)])


def _fit(probe: Pipeline, x: np.ndarray, y: np.ndarray) -> Pipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the max_iter cap is the setting's choice
        return probe.fit(x, y)
