"""Fine-tuned classification head: trained by the one training loop, kept as a stock transformers classifier.

``run`` builds the ``classify`` objective over a saved encoder, trains it with
``pipeline.train.loop.train`` on the streaming loader (frozen encoder, or fine-tuned with
layer-wise lr decay), measures top-1 / top-5 on the test shards, and saves the trained model in
``out_dir`` as ``ViTForImageClassification`` (image, and audio over log-mel inputs) or
``BertForSequenceClassification`` (text) with ``id2label``, beside a stock ``ViTImageProcessor``
set to the pipeline's eval preprocessing (or the tokenizer), so that
``transformers.pipeline("image-classification", model=out_dir)`` gives the evaluator's predictions.
``predictions.jsonl`` in ``out_dir`` lists them (key, label, predicted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from pipeline.config import ConfigError
from pipeline.evaluators.base import EvaluatorConfig, Metric, bootstrap, topk_hits

TASK = "finetune"


class Config(EvaluatorConfig):
    #: train the head only (True), or the encoder too with layer-wise lr decay
    frozen: bool = True
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    layer_decay: float = Field(0.75, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    #: random crops and flips while training (evaluation never augments)
    augment: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


def run(cfg: Config, encoders: Path, modality: str, train: str, test: str, label_key: str, out_dir: Path,
        accelerator=None, id2label: dict[int, str] | None = None) -> list[Metric]:
    """Train a head on ``train``, measure it on ``test``, save it in ``out_dir``.

    encoders: an encoder directory (``<stage>/encoders/<modality>``) or a stage directory holding
    ``encoders/<modality>``; train, test: shard specs; label_key: the shard key of the integer
    label; id2label: class id → name for the saved model (default: the id as text)."""
    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
    from pipeline.encoders import saved
    from pipeline.objectives import classify
    from pipeline.train.learner import Learner
    from pipeline.train.loop import OptimConfig, TrainerConfig
    from pipeline.train.loop import train as train_loop

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    enc_dir = _encoder_dir(Path(encoders), modality)
    torch.manual_seed(cfg.seed)
    mod, enc = saved.load(enc_dir, where=f"finetune.encoders ({enc_dir})")
    classes = sorted(id2label) if id2label else _labels(train, label_key)
    if len(classes) < 2:
        raise ConfigError(f"finetune: {train} holds {len(classes)} class under label key {label_key!r}; need 2 or more")
    ocfg = classify.Config(modality=modality, classes=classes, frozen=cfg.frozen, layer_decay=cfg.layer_decay,
                           label_smoothing=cfg.label_smoothing)
    obj = classify.Objective(ocfg, {modality: enc}, "classify", cfg.seed)
    learner = Learner({modality: enc}, {"classify": obj})

    def loader(spec: str, training: bool) -> StreamingLoader:
        src = {"data": SourceConfig(shards=spec, modalities=[modality], label=label_key)}
        lcfg = LoaderConfig(batch_size=cfg.batch_size, num_workers=cfg.num_workers, augment=training and cfg.augment,
                            epochs=None if training else 1)
        rank, world = (accelerator.process_index, accelerator.num_processes) if training else (0, 1)
        return StreamingLoader(src, lcfg, {modality: mod.cfg}, seed=cfg.seed, rank=rank, world_size=world)

    tcfg = TrainerConfig(steps=cfg.steps, log_every=max(1, cfg.steps // 20), checkpoint_every=cfg.steps,
                         keep_checkpoints=1, optim=OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay))
    work = out_dir / "train"
    train_loop(learner, loader(train, True), tcfg, work, accelerator, cfg.model_dump(mode="json"), progress=False)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the head below is what is kept
    model = accelerator.unwrap_model(learner) if hasattr(accelerator, "unwrap_model") else learner
    obj = model.objectives["classify"]
    names = {c: (id2label or {}).get(c, str(c)) for c in classes}
    metrics: list[Metric] = []
    if accelerator.is_main_process:
        keys, labels, scores = _predict(obj, loader(test, False), accelerator.device)
        targets = np.searchsorted(np.array(classes), labels)
        targets = np.where(np.array(classes)[np.minimum(targets, len(classes) - 1)] == labels, targets, -1)
        c = len(classes)
        extra = {"frozen": cfg.frozen, "steps": cfg.steps, "classes": c, "head": str(out_dir)}
        for top in (1, 5):
            if top == 5 and c < 5:
                continue
            hits = topk_hits(scores, targets, top)
            metrics.append(Metric(TASK, f"top{top}", float(hits.mean()), bootstrap(hits), min(top, c) / c,
                                  len(keys), dict(extra)))
        pred = scores.argmax(1)
        with open(out_dir / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps({"key": k, "label": names.get(int(y), str(y)), "predicted": names[classes[p]]}) + "\n" for k, y, p in zip(keys, labels, pred))
        from pipeline.evaluators import _stock_head

        _stock_head.save(obj, mod, {i: names[c] for i, c in enumerate(classes)}, out_dir)
    accelerator.wait_for_everyone()
    return metrics


def _encoder_dir(path: Path, modality: str) -> Path:
    for p in (path / "encoders" / modality, path / modality, path):
        if (p / "config.json").is_file():
            return p
    raise ConfigError(f"finetune.encoders: {path} holds no {modality} encoder (looked for encoders/{modality}/, "
                      f"{modality}/ and config.json)")


def _labels(spec: str, key: str) -> list[int]:
    """The sorted distinct integer labels under shard key ``key`` in the shards of ``spec``."""
    from pipeline.data.shards import iter_samples, open_shards

    seen: set[int] = set()
    for shard in open_shards(spec).shards:
        for sample in iter_samples(shard.path, exts={key}):
            raw = sample.get(key)
            if raw is None:
                raise ConfigError(f"finetune: {shard.path}: sample {sample['__key__']!r} has no label {key!r}")
            try:
                seen.add(int(raw.decode().strip()))
            except ValueError:
                raise ConfigError(f"finetune: {shard.path}: sample {sample['__key__']!r}: label {key!r} "
                                  f"is not an integer") from None
    return sorted(seen)


@torch.no_grad()
def _predict(obj, loader, device) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, labels [N], scores [N, C]) of every sample of ``loader``, without augmentation."""
    from pipeline.data.loader import to_device

    obj.eval()
    keys, labels, scores = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        keys += list(batch["__key__"])
        labels.append(batch["cls"].cpu().numpy())
        scores.append(obj.logits(batch).float().cpu().numpy())
    return keys, np.concatenate(labels), np.concatenate(scores)
