"""Cross-modal retrieval in a shared CLIP space: text → item and item → text Recall@K and median rank.

Items are images or audio clips, each paired with one caption. Captions are de-duplicated into the
text gallery, and every item sharing a caption is a positive of that text query: a text query hits
at K when any of its positives is among its K most similar items; an item hits at K when its own
caption is among its K most similar texts. Ranks are 1-based ranks of the best positive, with ties
counted against it. Similarities are computed a block of queries at a time.

Chance is exact for the same gallery: a text with P positives among N items hits at K by chance
with probability 1 - C(N-P, K) / C(N, K) (averaged over queries); an item, with one positive among
U texts, with probability K / U. Texts in ``text_feats`` that caption no item are not in the gallery.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy.special import gammaln

from pipeline.evaluators.base import EvaluatorConfig, Metric, bootstrap

TASK = "retrieval"
_BLOCK_CELLS = 1 << 24


class Config(EvaluatorConfig):
    #: the K of each Recall@K
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


def evaluate(cfg: Config, items: np.ndarray, item_texts: list[str],
             text_feats: dict[str, np.ndarray] | tuple[list[str], np.ndarray], modality: str) -> list[Metric]:
    """items: [N, E] item features; item_texts: the N captions; text_feats: caption → [E] or
    (captions, [U', E]) in the same space. Metrics named ``text_to_<modality>_R@K``,
    ``<modality>_to_text_R@K`` and ``..._median_rank`` for both directions."""
    items = _normalize(np.asarray(items, dtype=np.float32))
    if len(items) != len(item_texts):
        raise ValueError(f"retrieval: {len(items)} items but {len(item_texts)} captions")
    texts, owner = np.unique(np.asarray(item_texts, dtype=object).astype(str), return_inverse=True)
    gallery = _normalize(_lookup(texts.tolist(), text_feats, items.shape[1]))  # [U, E]
    t2i = text_to_item_ranks(gallery, items, owner)  # [U]
    i2t = item_to_text_ranks(items, gallery, owner)  # [N]
    positives = np.bincount(owner, minlength=len(texts))  # [U] items per caption
    n, u = len(items), len(texts)
    directions = [("text", modality, t2i, lambda k: float(text_to_item_chance(n, positives, k).mean()), n),
                  (modality, "text", i2t, lambda k: min(k, u) / u, u)]
    metrics = []
    for src, dst, ranks, chance, size in directions:
        for k in cfg.ks:
            hits = (ranks <= k).astype(np.float64)
            metrics.append(Metric(TASK, f"{src}_to_{dst}_R@{k}", float(hits.mean()), bootstrap(hits), chance(k),
                                  len(ranks), {"gallery": size}))
    metrics.append(Metric(TASK, f"text_to_{modality}_median_rank", float(np.median(t2i)),
                          bootstrap(t2i, statistic="median"), float(np.median(chance_median_rank(n, positives))),
                          u, {"gallery": n}))
    metrics.append(Metric(TASK, f"{modality}_to_text_median_rank", float(np.median(i2t)),
                          bootstrap(i2t, statistic="median"), float(chance_median_rank(u, np.ones(1, int))[0]),
                          n, {"gallery": u}))
    return metrics


def text_to_item_ranks(texts: np.ndarray, items: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """texts: [U, E], items: [N, E] unit rows; owner: [N] caption index of each item → [U] 1-based
    rank of each text's best positive item."""
    ranks = np.empty(len(texts), dtype=np.int64)
    block = max(1, _BLOCK_CELLS // len(items))
    for start in range(0, len(texts), block):
        sim = texts[start:start + block] @ items.T  # [b, N]
        is_pos = owner[None, :] == np.arange(start, start + len(sim))[:, None]  # [b, N]
        best = np.where(is_pos, sim, -np.inf).max(axis=1, keepdims=True)
        # items at least as similar as the best positive, bar that positive itself
        ranks[start:start + len(sim)] = (sim >= best).sum(axis=1)
    return ranks


def item_to_text_ranks(items: np.ndarray, texts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """items: [N, E], texts: [U, E] unit rows; owner: [N] → [N] 1-based rank of each item's caption."""
    ranks = np.empty(len(items), dtype=np.int64)
    block = max(1, _BLOCK_CELLS // len(texts))
    for start in range(0, len(items), block):
        sim = items[start:start + block] @ texts.T  # [b, U]
        own = np.take_along_axis(sim, owner[start:start + len(sim), None], axis=1)
        ranks[start:start + len(sim)] = (sim >= own).sum(axis=1)
    return ranks


def text_to_item_chance(n: int, positives: np.ndarray, k: int) -> np.ndarray:
    """[U] probability that a random ordering of ``n`` items puts one of each query's P positives
    in the top ``k``: 1 - C(n-P, k) / C(n, k)."""
    j = np.arange(min(k, n))[None, :]  # C(n-P, k) / C(n, k) = prod_j (n-P-j) / (n-j), exact for small k
    p = np.asarray(positives, dtype=np.float64)[:, None]
    miss = np.prod(np.clip((n - p - j) / (n - j), 0.0, None), axis=1)
    return 1.0 - miss


def chance_median_rank(n: int, positives: np.ndarray) -> np.ndarray:
    """[U] median rank of the best of P positives in a random ordering of ``n``: the smallest r with
    P(best rank <= r) = 1 - C(n-r, P) / C(n, P) >= 1/2."""
    r = np.arange(1, n + 1)
    out = np.empty(len(positives))
    for p in np.unique(positives):
        miss = np.where(n - r >= p, np.exp(_log_comb(n - r, p) - _log_comb(n, p)), 0.0)
        out[positives == p] = r[np.argmax(1.0 - miss >= 0.5 - 1e-12)]
    return out


def _log_comb(n, k):
    n = np.asarray(n, dtype=np.float64)
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _lookup(texts: list[str], text_feats, dim: int) -> np.ndarray:
    """[U, E] features of ``texts`` from a caption → vector mapping or a (captions, [U', E]) pair."""
    if isinstance(text_feats, tuple):
        names, matrix = text_feats
        if len(names) != len(matrix):
            raise ValueError(f"retrieval: {len(names)} captions but {len(matrix)} text feature rows")
        text_feats = dict(zip(names, matrix))
    missing = [t for t in texts if t not in text_feats]
    if missing:
        raise ValueError(f"retrieval: no text features for {len(missing)} captions, first {missing[0]!r}")
    out = np.stack([np.asarray(text_feats[t], dtype=np.float32) for t in texts])
    if out.shape[1] != dim:
        raise ValueError(f"retrieval: text features are {out.shape[1]}-d, items {dim}-d")
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
