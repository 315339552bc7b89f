"""Evaluate frozen encoders on shard sets: kNN, linear probe, zero-shot, retrieval (and fine-tuned
heads), every figure beside its random-init, raw-input and chance baselines.

    selfsup evaluate --encoders runs/starter/data2vec_image --data data/starter/fmnist/test \
        --train-data data/starter/fmnist/train --task knn,linear_probe --out eval/
    selfsup evaluate --encoders runs/starter/clip_image_text --data shards/ --task zero_shot,retrieval \
        --class-key category --out eval/

``--encoders`` is a pretrain stage directory, an exported directory or a stock transformers one;
``--data`` any shard set with standard keys (``png``/``jpg``, ``txt``, ``cls``, ``flac``/``wav``,
``json``). Without ``--train-data`` the probes train on half of ``--data`` (a key-hash split).

Validation on a training split: ``--holdout 0.1`` tests on the share of each ``--data`` set that a
recipe source with ``holdout: 0.1`` (and the same ``holdout_by``) holds out of pretraining, and
trains the probes on the rest, so settings are chosen on samples no stage trained on:

    selfsup evaluate --encoders runs/val/joint_image --data data/starter/fmnist/train --holdout 0.1 \
        --task knn,linear_probe --out eval-val/
    selfsup evaluate --encoders runs/val/clip_audio_text --data data/starter/speech/train \
        --holdout 0.1 --holdout-by voice --task retrieval --out eval-val/   # whole voices held out
In a recipe, ``encoders`` and ``data`` may be lists: every encoder directory is evaluated on every
set holding one of its modalities. Writes ``report.json`` (``pipeline/evaluation/report.schema.json``),
``report.html`` and ``cache/`` (embeddings, reused when nothing changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipeline.config import ConfigError
from pipeline.stage import Context, StageConfig


class Config(StageConfig):
    #: encoder directories (pretrain stage, exported, or stock transformers)
    encoders: str | list[str]
    #: test shard sets
    data: str | list[str]
    #: training side of the probes, one per test set (default: half of each test set)
    train_data: str | list[str] | None = None
    #: comma-separated: knn, linear_probe, zero_shot, retrieval, finetune
    task: str | list[str] = Field(default_factory=lambda: ["knn", "linear_probe", "zero_shot", "retrieval"])
    #: validation: test on this share of each --data set held out by hash (a recipe source's
    #: ``holdout``), train the probes on the rest; not with --train-data
    holdout: float = Field(0.0, ge=0, lt=1)
    #: json field the holdout hashes instead of the key (``voice``: whole voices held out); a list
    #: gives one per --data set (null: the key)
    holdout_by: str | list[str | None] | None = None
    label_key: str = "cls"
    #: class names, one per line (line i names class i) for zero-shot
    classes: str | None = None
    #: json field(s) of the samples naming their class (the first one present is used)
    class_key: str | list[str] | None = None
    #: output directory (required on the command line)
    out: str | None = None
    #: samples of each test set and of each training side embedded at most (seeded pick of shards)
    max_test: int | None = Field(2000, ge=1)
    max_train: int | None = Field(3000, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    #: per-evaluator settings, e.g. {linear_probe: {Cs: [0.1, 1.0]}}
    evaluators: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: torch threads for the embedding passes (0: leave torch's default)
    threads: int = Field(0, ge=0)

    @field_validator("encoders", "data", "train_data", "task", "class_key", "holdout_by")
    @classmethod
    def _listed(cls, v):
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()] if "," in v else [v]
        return v

    def tasks(self) -> list[str]:
        from pipeline.evaluation.suite import TASKS

        for t in self.task:
            if t not in TASKS:
                import difflib

                close = difflib.get_close_matches(t, TASKS, n=1)
                raise ConfigError(f"evaluate.task: unknown task {t!r}" + (f" (did you mean {close[0]}?)" if close else "")
                                  + f"; choose from {', '.join(TASKS)}")
        return list(self.task)

    def class_keys(self) -> list[str]:
        return list(self.class_key or [])

    def splits(self) -> list[dict]:
        """Per --data set, the source settings of its held-out part: {} where nothing is held out."""
        if not self.holdout:
            if self.holdout_by:
                raise ConfigError("evaluate.holdout_by needs holdout: the share held out (e.g. 0.1)")
            return [{} for _ in self.data]
        if self.train_data:
            raise ConfigError("evaluate.holdout splits --data into test (held out) and training (the rest); "
                              "leave out train_data")
        by = self.holdout_by or [None]
        if len(by) == 1:
            by = by * len(self.data)
        if len(by) != len(self.data):
            raise ConfigError(f"evaluate.holdout_by: {len(by)} fields for {len(self.data)} --data sets; "
                              "give one field, or one per set (null: the key)")
        return [{"holdout": self.holdout, "holdout_by": b or None} for b in by]


def inputs(cfg: Config, ctx: Context) -> list[str]:
    """The evaluated encoders' weights: a retrained stage reruns the evaluation."""
    files = []
    for e in cfg.encoders:
        root = ctx.path(e)
        files += [str(p) for p in sorted(root.rglob("*.safetensors")) if "checkpoints" not in p.parts]
        files += [str(p) for p in sorted(root.rglob("*.json")) if "checkpoints" not in p.parts and p.name != "done.json"]
    return files


def run(cfg: Config, ctx: Context) -> dict:
    import torch

    from pipeline.evaluation.suite import run_suite

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.train_data and len(cfg.train_data) != len(cfg.data):
        raise ConfigError(f"evaluate.train_data: {len(cfg.train_data)} sets for {len(cfg.data)} test sets; "
                          "give one training set per test set")
    cfg.tasks()
    cfg.splits()
    resolved = cfg.model_copy(update={
        "encoders": [str(ctx.path(e)) for e in cfg.encoders], "data": [str(ctx.path(d)) for d in cfg.data],
        "train_data": [str(ctx.path(d)) for d in cfg.train_data] if cfg.train_data else None,
        "classes": str(ctx.path(cfg.classes)) if cfg.classes else None})
    out = Path(ctx.path(cfg.out)) if cfg.out else ctx.out_dir
    rep = run_suite(resolved, out, progress=ctx.progress)
    losses = [f"{e['encoder']} {e['task']}/{e['metric']}" for e in rep["entries"]
              if e["baselines"]["random_init"] is not None and not e["metric"].endswith("median_rank")
              and e["value"] < e["baselines"]["random_init"]]
    for line in losses:
        ctx.log.warning("below its random-init twin: %s", line)
    ctx.log.info("report: %s (%d figures, %.1f s)", out / "report.html", len(rep["entries"]), rep["runs"]["seconds"])
    return {"entries": len(rep["entries"]), "seconds": rep["runs"]["seconds"], "report": str(out / "report.json")}
