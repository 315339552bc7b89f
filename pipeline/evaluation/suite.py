"""The evaluation suite: for every (encoder directory, shard set) pair, the asked tasks, each figure
measured beside its baselines in the same run (the same architecture at random init, the raw
input for probes, chance), then ``report.json`` and ``report.html``.

Each (encoder, set, space) is embedded once through ``embed`` with a shared cache, so kNN and the
linear probe read one pass, and the random-init and raw-input passes are shared by every stage of
one architecture. Tasks that do not apply to a pair (no labels, no CLIP heads, no class names) are
skipped for it; a task asked for that applies to no pair at all is an error naming it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.config import ConfigError
from pipeline.evaluation import baselines, page, report
from pipeline.evaluation.embed import embed, embed_strings
from pipeline.evaluation.encoders import encoder_dirs
from pipeline.evaluators import knn, linear_probe, retrieval, zero_shot
from pipeline.evaluators.base import Features

TASKS = ("knn", "linear_probe", "zero_shot", "retrieval", "finetune")
PROBES = ("knn", "linear_probe")


def run_suite(cfg, out_dir: Path, accelerator=None, progress: bool = True) -> dict:
    """Evaluate ``cfg.encoders`` × ``cfg.data`` (settings: ``stages.evaluate.Config``); returns the report."""
    start = time.perf_counter()
    tasks = cfg.tasks()
    cache = out_dir / "cache"
    entries: list[dict] = []
    figures: dict = {"examples": []}
    used: set[str] = set()
    splits = cfg.splits()
    for enc in cfg.encoders:
        mods = encoder_dirs(enc)
        heads = _clip_modalities(Path(enc))
        for i, test in enumerate(cfg.data):
            train = cfg.train_data[i] if cfg.train_data else None
            pair = _Pair(cfg, enc, test, train, cache, progress, accelerator, splits[i])
            if not pair.modalities(mods):
                continue
            for m in pair.modalities(mods):
                if any(t in tasks for t in PROBES) and pair.has_labels:
                    entries += pair.probes(m, [t for t in PROBES if t in tasks], figures)
                    used.update(t for t in PROBES if t in tasks)
                if m != "text" and m in heads and "text" in heads:
                    if "zero_shot" in tasks and pair.has_labels and (names := pair.class_names()) is not None:
                        entries += pair.zero_shot(m, names)
                        used.add("zero_shot")
                    if "retrieval" in tasks and pair.has_texts:
                        entries += pair.retrieval(m, figures)
                        used.add("retrieval")
                if "finetune" in tasks and pair.has_labels:
                    entries += pair.finetune(m, out_dir)
                    used.add("finetune")
    missing = [t for t in tasks if t not in used]
    if missing:
        raise ConfigError(f"evaluate: task {missing[0]!r} applies to none of the encoder/data pairs "
                          f"({_why(missing[0])})")
    context = {"encoders": [str(e) for e in cfg.encoders], "data": [str(d) for d in cfg.data],
               "train_data": [str(d) for d in cfg.train_data or []], "tasks": list(tasks),
               **({"holdout": splits} if cfg.holdout else {}),
               "seconds": time.perf_counter() - start}
    rep = report.write_report(out_dir, entries, context)
    curves = {Path(e).name: _metrics(Path(e)) for e in cfg.encoders if (Path(e) / "metrics.jsonl").is_file()}
    page.write_html(out_dir, rep, curves=curves or None, embedding_map=figures.get("map"),
                      confusion=figures.get("confusion"),
                      retrieval_examples=figures["examples"][:6])
    return rep


def _why(task: str) -> str:
    return {"zero_shot": "it needs CLIP heads with a text tower, labels and class names (--classes or --class-key)",
            "retrieval": "it needs CLIP heads with a text tower and captions (txt) in the data",
            "finetune": "it needs labels and the finetune evaluator"}.get(task, "it needs labels (--label-key)")


def _clip_modalities(path: Path) -> set[str]:
    from pipeline.encoders import saved

    found: set[str] = set()
    for d in sorted((path / "heads").glob("*")) if (path / "heads").is_dir() else []:
        if (d / saved.HEADS_SETTINGS).is_file() and (info := saved.heads_settings(d))["objective"] == "clip":
            found.update(info["modalities"])
    return found


def _metrics(stage: Path) -> list[dict]:
    rows = []
    for line in (stage / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed run
            continue
    return rows


class _Pair:
    """One encoder directory and one test set (with its training side): its embeddings, memoized."""

    def __init__(self, cfg, enc, test, train, cache, progress, accelerator, split: dict):
        from pipeline.data.shards import iter_samples, open_shards

        self.cfg, self.enc, self.test, self.train, self.held = cfg, enc, test, train, split
        self.kw = {"cache_dir": cache, "progress": progress, "accelerator": accelerator, "label_key": cfg.label_key,
                   "batch_size": cfg.batch_size}
        first = next(iter_samples(open_shards(test).shards[0].path, 0, 1), {})
        self.sample = first
        self.has_labels = bool(cfg.label_key) and cfg.label_key in first
        self.has_texts = "txt" in first
        self.data_name = _short(test) + _held_out(split)

    def modalities(self, mods: dict) -> list[str]:
        from pipeline import registry

        return [m for m in mods if any(e in self.sample for e in registry.modality(m).extensions)]

    def emb(self, which: str, m: str, space: str = "encoder", random_init: bool = False) -> Features:
        """Features of the test side or the training side; with a holdout, both are parts of the test set."""
        data = self.test if which == "test" or self.held else self.train
        limit = self.cfg.max_test if which == "test" else self.cfg.max_train
        split = {**self.held, "part": "holdout" if which == "test" else "rest"} if self.held else None
        return embed(self.enc, data, modalities=[m], space=space, random_init=random_init, limit=limit,
                     seed=self.cfg.seed, split=split, **self.kw).features[m]

    def split(self, m: str, **kw) -> tuple[Features, Features]:
        """(train, test) features: the training set's, the rest and the held-out part of the test set
        (``holdout``), or halves of the test set by key hash."""
        test = self.emb("test", m, **kw)
        if self.train or self.held:
            return self.emb("train", m, **kw), test
        from pipeline.data.seeding import hash_int

        held = np.array([hash_int(self.cfg.seed, "split", k) % 2 == 0 for k in test.keys])
        return test.subset(~held), test.subset(held)

    def probes(self, m: str, tasks: list[str], figures: dict) -> list[dict]:
        trained, rand = self.split(m), self.split(m, random_init=True)
        raw = self._raw(m)
        out = []
        for task in tasks:
            module = {"knn": knn, "linear_probe": linear_probe}[task]
            ecfg = module.Config(**self.cfg.evaluators.get(task, {}))
            # one BLAS thread: small fits on shared cores run many times slower with a thread per core
            with threadpool_limits(limits=1, user_api="blas"):
                t0 = time.perf_counter()
                metrics = module.evaluate(ecfg, *trained)
                seconds = time.perf_counter() - t0
                base_r = {b.name: b.value for b in module.evaluate(ecfg, *rand)}
                base_x = {b.name: b.value for b in module.evaluate(ecfg, *raw)}
            for metric in metrics:
                metric.extra["modality"] = m
                out.append(report.entry(metric, baselines={"random_init": base_r.get(metric.name),
                                                           "raw_input": base_x.get(metric.name)},
                                        encoder=f"{Path(self.enc).name}/{m}", data=self.data_name,
                                        n_train=len(trained[0]), seconds=seconds))
        if "map" not in figures and m != "text":
            names = self.class_names()
            figures["map"] = {"x": trained[1].x, "labels": trained[1].labels, "names": names,
                              "title": f"{Path(self.enc).name}/{m} on {self.data_name}"}
            probe = next((e for e in out if e["task"] == "linear_probe"), None)
            if probe is not None:
                ids = probe["extra"]["labels"]
                figures["confusion"] = {"matrix": probe["extra"]["confusion"],
                                        "labels": [names[i] if names and i < len(names) else str(i) for i in ids],
                                        "title": f"linear probe, {probe['encoder']} on {probe['data']}"}
        return out

    def _raw(self, m: str) -> tuple[Features, Features]:
        if m != "text":
            return self.split(m, space="raw")
        train, test = self.split(m)
        tr, te = baselines.tfidf_features(train.texts, test.texts)
        return Features(tr, train.keys, train.labels), Features(te, test.keys, test.labels)

    def class_names(self) -> list[str] | None:
        if self.cfg.classes:
            names = [ln.strip() for ln in Path(self.cfg.classes).read_text().splitlines() if ln.strip()]
            if not names:
                raise ConfigError(f"--classes {self.cfg.classes}: no class names (one per line)")
            return names
        keys = self.cfg.class_keys()
        if not keys:
            return None
        return class_names_from(self.test, self.train, self.cfg.label_key, keys)

    def zero_shot(self, m: str, names: list[str]) -> list[dict]:
        zcfg = zero_shot.Config(**self.cfg.evaluators.get("zero_shot", {}))
        results = {}
        for rand in (False, True):
            test = self.emb("test", m, space="clip", random_init=rand)
            keep = test.labels < len(names)
            prompts = zero_shot.prompts(names, m, zcfg)
            flat = embed_strings(self.enc, [p for ps in prompts for p in ps], random_init=rand, seed=self.cfg.seed)
            emb = zero_shot.class_embeddings(flat.reshape(len(names), len(prompts[0]), -1))
            t0 = time.perf_counter()
            results[rand] = (zero_shot.evaluate(zcfg, test.subset(keep), emb), time.perf_counter() - t0, len(test))
        base = {b.name: b.value for b in results[True][0]}
        return [report.entry(metric, baselines={"random_init": base.get(metric.name), "raw_input": None},
                             encoder=f"{Path(self.enc).name}/{m}", data=self.data_name, n_train=None,
                             seconds=results[False][1]) for metric in results[False][0]]

    def retrieval(self, m: str, figures: dict) -> list[dict]:
        rcfg = retrieval.Config(**self.cfg.evaluators.get("retrieval", {}))
        runs = {}
        for rand in (False, True):
            items = self.emb("test", m, space="clip", random_init=rand)
            texts = self.emb("test", "text", space="clip", random_init=rand)
            gallery = dict(zip(items.texts, texts.x))
            t0 = time.perf_counter()
            runs[rand] = (retrieval.evaluate(rcfg, items.x, items.texts, gallery, m), time.perf_counter() - t0)
            if not rand and len(figures["examples"]) < 6:
                figures["examples"] += _examples(self.test, items, gallery, m, 6 - len(figures["examples"]))
        base = {b.name: b.value for b in runs[True][0]}
        return [report.entry(metric, baselines={"random_init": base.get(metric.name), "raw_input": None},
                             encoder=f"{Path(self.enc).name}/{m}+text", data=self.data_name, n_train=None,
                             seconds=runs[False][1]) for metric in runs[False][0]]

    def finetune(self, m: str, out_dir: Path) -> list[dict]:
        try:
            from pipeline.evaluators import finetune
        except ImportError:
            raise ConfigError("evaluate: task 'finetune' needs pipeline.evaluators.finetune, "
                              "which this installation lacks") from None
        if not self.train:
            raise ConfigError("evaluate: task 'finetune' needs --train-data" + (" (it does not read holdout splits)"
                                                                              if self.held else ""))
        fcfg = finetune.Config(**self.cfg.evaluators.get("finetune", {}))
        d = encoder_dirs(self.enc)[m]
        t0 = time.perf_counter()
        head_dir = out_dir / "heads" / f"{Path(self.enc).name}-{m}-{_short(self.test).replace('/', '_')}"
        metrics = finetune.run(fcfg, d, m, self.train, self.test, self.cfg.label_key, head_dir)
        return [report.entry(metric, baselines={"random_init": metric.extra.get("random_init"), "raw_input": None},
                             encoder=f"{Path(self.enc).name}/{m}", data=self.data_name, n_train=None,
                             seconds=time.perf_counter() - t0) for metric in metrics]


def class_names_from(test, train, label_key: str, keys: list[str]) -> list[str] | None:
    """Class id → name, read from the first of ``keys`` the samples' json holds (the most common value
    per class); None when none of them is there."""
    from collections import Counter

    from pipeline.data.shards import iter_samples, open_shards

    seen: dict[int, Counter] = {}
    key = None
    for spec in [s for s in (test, train) if s]:
        for shard in open_shards(spec).shards:
            for sample in iter_samples(shard.path, exts={"json", label_key}):
                if sample.get("json") is None or sample.get(label_key) is None:
                    return None
                info = json.loads(sample["json"])
                key = key or next((k for k in keys if k in info), None)
                if key is None:
                    return None
                seen.setdefault(int(sample[label_key]), Counter())[str(info.get(key, ""))] += 1
        if seen:
            break
    if not seen:
        return None
    return [seen[c].most_common(1)[0][0] if c in seen else f"class {c}" for c in range(max(seen) + 1)]


def _examples(spec, items: Features, gallery: dict, m: str, n: int) -> list[dict]:
    """Text → top-5 items with their media (thumbnails, audio players), for the first ``n`` captions."""
    from pipeline import registry
    from pipeline.data.shards import iter_samples, open_shards

    captions = list(dict.fromkeys(items.texts))[:: max(1, len(set(items.texts)) // n)][:n]
    x = items.x / np.linalg.norm(items.x, axis=1, keepdims=True).clip(1e-12)
    wanted, out = {}, []
    for q in captions:
        g = gallery[q] / max(np.linalg.norm(gallery[q]), 1e-12)
        scores = x @ g
        top = np.argsort(-scores)[:5]
        out.append({"query": q, "hits": [{"key": items.keys[i], "score": float(scores[i]),
                                          "correct": items.texts[i] == q} for i in top]})
        wanted.update({items.keys[i]: None for i in top})
    exts = registry.modality(m).extensions
    for shard in open_shards(spec).shards:
        for sample in iter_samples(shard.path, exts=set(exts)):
            if sample["__key__"] in wanted:
                ext = next(e for e in exts if sample.get(e) is not None)
                wanted[sample["__key__"]] = (ext, sample[ext])
    for card in out:
        for hit in card["hits"]:
            media = wanted.get(hit["key"])
            if media and media[0] == "png":
                hit["image_png_bytes"] = media[1]
            elif media and m == "audio":
                hit["audio_bytes"], hit["mime"] = media[1], f"audio/{media[0]}"
    return out


def _held_out(split: dict) -> str:
    """How the report names the held-out part: `` (held out 10% by voice)``; nothing without one."""
    if not split:
        return ""
    by = f" by {split['holdout_by']}" if split.get("holdout_by") else ""
    return f" (held out {split['holdout']:.0%}{by})"


def _short(spec) -> str:
    parts = Path(str(spec[0] if isinstance(spec, list) else spec)).parts
    return "/".join(parts[-2:])
