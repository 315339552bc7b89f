"""Zero-shot classification in a shared CLIP space: class names become prompts, prompts become
text embeddings, and each test item takes the class whose embedding is most cosine-similar.

Class embeddings follow the CLIP_benchmark protocol: each prompt's embedding is L2-normalized, the
T templates of a class are averaged, and the average is normalized again. Encoding the prompts is
the caller's job (``prompts`` → text encoder → ``class_embeddings``), so this module needs no model.

Chance is 1 / C for top-1 and mean per-class recall, 5 / C for top-5 (C = number of class names).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from pipeline.config import ConfigError
from pipeline.evaluators.base import EvaluatorConfig, Features, Metric, bootstrap, topk_hits

TASK = "zero_shot"

#: a few generic templates per modality of the items being classified; ``{}`` is the class name
TEMPLATES = {
    "image": ["{}", "a photo of a {}.", "a picture of {}.", "an emoji of {}."],
    "audio": ["{}", "someone saying {}.", "the word {}.", "the sound of {}."],
    "text": ["{}"],
}


class Config(EvaluatorConfig):
    #: prompt templates per modality of the classified items; each holds one ``{}``
    templates: dict[str, list[str]] = Field(default_factory=lambda: {m: list(t) for m, t in TEMPLATES.items()})

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for modality, templates in value.items():
            if not templates:
                raise ValueError(f"templates.{modality}: give at least one template")
            for t in templates:
                if t.count("{}") != 1:
                    raise ValueError(f"templates.{modality}: {t!r} must hold exactly one '{{}}' for the class name")
        return value


def prompts(class_names: list[str], modality: str, cfg: Config) -> list[list[str]]:
    """C lists of T prompts: every template of ``modality`` filled with each class name."""
    if modality not in cfg.templates:
        raise ConfigError(f"zero_shot.templates: no templates for modality {modality!r}; "
                          f"have {', '.join(sorted(cfg.templates))}")
    return [[t.replace("{}", name) for t in cfg.templates[modality]] for name in class_names]


def class_embeddings(text_feats: np.ndarray) -> np.ndarray:
    """text_feats: [C, T, E] prompt embeddings → [C, E] unit class embeddings."""
    feats = np.asarray(text_feats, dtype=np.float32)
    if feats.ndim != 3:
        raise ValueError(f"zero_shot: text features must be [classes, templates, dim], got shape {feats.shape}")
    mean = _normalize(feats).mean(axis=1)
    return _normalize(mean)


def evaluate(cfg: Config, test: Features, class_emb: np.ndarray) -> list[Metric]:
    """Top-1, top-5 (at least 5 classes) and mean per-class recall of ``test`` against ``class_emb``
    [C, E]; ``test.labels`` index its rows and ``test.x`` [N, E] lives in the same space."""
    if test.labels is None:
        raise ValueError("zero_shot: test features need labels")
    class_emb = np.asarray(class_emb, dtype=np.float32)
    c = len(class_emb)
    if class_emb.ndim != 2 or class_emb.shape[1] != test.x.shape[1]:
        raise ValueError(f"zero_shot: class embeddings {class_emb.shape} do not match {test.x.shape[1]}-d features")
    if test.labels.min() < 0 or test.labels.max() >= c:
        raise ValueError(f"zero_shot: labels must index the {c} class embeddings, "
                         f"got {test.labels.min()}..{test.labels.max()}")
    logits = _normalize(test.x) @ _normalize(class_emb).T  # [N, C] cosine similarities
    extra = {"classes": c, "templates": {m: len(t) for m, t in cfg.templates.items()}}
    metrics = []
    for top in (1, 5):
        if top == 5 and c < 5:
            continue
        hits = topk_hits(logits, test.labels, top)
        metrics.append(Metric(TASK, f"top{top}", float(hits.mean()), bootstrap(hits), min(top, c) / c, len(test),
                              dict(extra)))
    hits = topk_hits(logits, test.labels, 1)
    present = np.unique(test.labels)
    recall = {int(k): float(hits[test.labels == k].mean()) for k in present}
    metrics.append(Metric(TASK, "mean_per_class_recall", float(np.mean(list(recall.values()))),
                          bootstrap(hits, groups=test.labels), 1.0 / c, len(test),
                          {**extra, "per_class_recall": recall}))
    return metrics


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
