"""The report's figures as PNG bytes (matplotlib, Agg backend: no display needed): training loss
curves, a confusion matrix and a 2-D map of embeddings. Each returns None when it has nothing to
draw, so the report simply leaves that section out.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: a headless machine has no display
import matplotlib.pyplot as plt
import numpy as np

#: at most this many points on the embedding map (PCA of more would be fine; the scatter would not)
MAX_POINTS = 2000


def dedup_steps(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows → one row per step, sorted by step. A resumed run logs the steps after its
    last checkpoint again; the LAST row of a step is the one the surviving run wrote."""
    by_step = {}
    for row in rows:
        if isinstance(row.get("step"), (int, float)):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def loss_keys(rows: list[dict]) -> list[str]:
    """Numeric keys of the rows that name a loss (``loss``, ``loss/mae``, ``val_loss``, ...)."""
    keys = {k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))}
    return sorted(keys, key=lambda k: (k != "loss", k))


def loss_curves_png(curves: dict[str, list[dict]]) -> bytes | None:
    """curves: stage name → metrics.jsonl rows → one panel per stage, one line per loss key."""
    stages = {name: dedup_steps(rows) for name, rows in (curves or {}).items()}
    stages = {name: rows for name, rows in stages.items() if loss_keys(rows)}
    if not stages:
        return None
    cols = min(2, len(stages))
    nrows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, stages.items()):
        for key in loss_keys(rows):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key, linewidth=1.4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    return _png(fig)


def confusion_png(matrix, labels: list[str] | None = None, title: str = "confusion matrix") -> bytes | None:
    """matrix: [C, C] counts, rows the true class, columns the predicted one. Colour is the row
    share (so rare classes read as clearly as common ones); counts are written when C <= 20."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        return None
    c = len(m)
    labels = [str(x)[:18] for x in (labels if labels is not None else range(c))]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = min(10.0, 3.0 + 0.35 * c)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(c) if c <= 40 else np.arange(0, c, math.ceil(c / 40))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    if c <= 20:
        for i, j in np.ndindex(m.shape):
            if m[i, j]:
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def embedding_png(x, labels=None, names: list[str] | None = None, title: str = "embedding map",
                  seed: int = 0) -> bytes | None:
    """x: [N, D] features (D > 2 projected on their first two principal components), labels: [N]
    class ids colouring the points; at most ``MAX_POINTS`` points, drawn at random (seeded)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        return None
    keep = np.sort(np.random.default_rng(seed).permutation(len(x))[:MAX_POINTS])
    x = x[keep]
    y = None if labels is None else np.asarray(labels)[keep]
    xy = PCA(n_components=2, random_state=seed).fit_transform(x) if x.shape[1] > 2 else x
    fig, ax = plt.subplots(figsize=(7.5, 6))
    if y is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7)
    else:
        classes = np.unique(y)
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for i, c in enumerate(classes):
            sel = y == c
            label = names[int(c)] if names is not None and 0 <= int(c) < len(names) else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=label)
        if len(classes) <= 20:
            ax.legend(fontsize=8, markerscale=2, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title(f"{title} ({len(xy)} points{', PCA' if x.shape[1] > 2 else ''})")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
