"""Frozen encoder(s) + a shard set → features, keys, labels: the one pass every evaluator shares.

    selfsup embed --encoders runs/starter/data2vec_image --data data/starter/fmnist/test --out fmnist.safetensors

Samples go through the project's streaming loader for one epoch, without augmentation, with the
modality settings the encoder directory was saved with (its eval preprocessing). Under
``accelerate launch`` every process embeds its share of the shards and process 0 gathers the rows.
Rows come back in shard order (shard, then position in it), whatever the number of processes, so a
cached pass and a fresh one agree row for row.

``space`` chooses what a row is: ``"encoder"`` the pooled embedding the encoder directory declares
(its ``pooling``), ``"clip"`` that embedding through the CLIP projection of ``heads/clip*``,
L2-normalized, and ``"raw"`` the input itself (pixels, log-mel statistics; text has no raw vector,
its ``texts`` are the raw input). ``random_init=True`` embeds with the same architecture at random
init, the baseline every figure is reported beside.

With ``cache_dir`` a pass is stored under a content hash of (encoder weights, shard files,
settings), so several evaluators, or a rerun, read one pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.evaluation.encoders import clip_projections, encoder_dirs, load_encoders
from pipeline.evaluators.base import Features

SPACES = ("encoder", "clip", "raw")
#: bumps when what a cached pass holds changes
_CACHE_VERSION = 1


@dataclass
class Embedding:
    """Features of one shard set, one ``Features`` per modality, rows aligned across modalities."""

    features: dict[str, Features]
    #: per sample (aligned with keys): (shard path or url, position in that shard)
    where: list[tuple[str, int]]


def embed(encoders: str | Path, data: str | list[str], *, modalities: list[str] | None = None,
          space: str = "encoder", label_key: str | None = "cls", batch_size: int = 64, num_workers: int = 0,
          accelerator=None, cache_dir: str | Path | None = None, progress: bool = True,
          random_init: bool = False, seed: int = 0, limit: int | None = None,
          split: dict | None = None) -> Embedding:
    """Embed every sample of ``data`` with the encoders of ``encoders`` (see the module docstring).

    modalities: those to embed (default: every encoder modality the samples hold). label_key: the
    shard key of integer labels, used where the samples have it. limit: embed at most this many
    samples (a fixed, seeded pick of whole shards read in the loader's order), to keep probes' training side small.
    split: a part of ``data`` only, as a recipe source reads it (``{holdout: 0.1, holdout_by: voice,
    part: holdout}``, see ``pipeline.data.settings.SourceConfig``)."""
    if space not in SPACES:
        raise ConfigError(f"embed: space must be one of {', '.join(SPACES)}, got {space!r}")
    from pipeline.data.shards import open_shards

    shardset = open_shards(data)
    if not shardset.shards:
        raise ConfigError(f"--data {data}: no shards")
    dirs = encoder_dirs(encoders)
    first = _first_sample(shardset.shards[0].path)
    chosen = _choose(dirs, first, modalities, encoders, data)
    label = label_key if label_key and label_key in first else None
    settings = {"v": _CACHE_VERSION, "space": space, "modalities": chosen, "label": label, "random_init": random_init,
                "seed": seed, "limit": limit, **({"split": split} if split else {})}
    cache = _cache_file(cache_dir, dirs, chosen, shardset, settings) if cache_dir else None
    rank = accelerator.process_index if accelerator is not None else 0
    if cache is not None and cache.with_suffix(".json").is_file():
        return _read(cache)
    result = _compute(encoders, data, shardset, chosen, space, label, batch_size, num_workers, accelerator, progress,
                      random_init, seed, limit, split or {})
    if cache is not None and rank == 0:
        _write(cache, result)
    return result


def _first_sample(path: str) -> dict:
    from pipeline.data.shards import iter_samples

    sample = next(iter_samples(path, 0, 1), None)
    if sample is None:
        raise ConfigError(f"{path}: empty shard")
    return sample


def _choose(dirs: dict, sample: dict, modalities, encoders, data) -> list[str]:
    from pipeline import registry

    have = [m for m in dirs if registry.modality(m).extensions and any(e in sample for e in registry.modality(m).extensions)]
    if modalities is None:
        if not have:
            raise ConfigError(f"--data {data}: samples hold none of the encoder modalities of {encoders} "
                              f"({', '.join(dirs)}); keys: {', '.join(k for k in sample if not k.startswith('__'))}")
        return have
    for m in modalities:
        if m not in dirs:
            raise ConfigError(f"embed: no {m} encoder in {encoders} (has {', '.join(dirs)})")
        if m not in have:
            raise ConfigError(f"--data {data}: samples hold no {m} ({', '.join(registry.modality(m).extensions)})")
    return list(modalities)


def _compute(encoders, data, shardset, chosen, space, label, batch_size, num_workers, accelerator, progress,
             random_init, seed, limit, split) -> Embedding:
    import torch

    from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader, to_device

    every = load_encoders(encoders, random_init=random_init, seed=seed)
    heads = (clip_projections(encoders, {m: e for m, (e, _) in every.items()}, random_init=random_init, seed=seed)
             if space == "clip" else {})
    loaded = {m: v for m, v in every.items() if m in chosen}
    if space == "clip":
        chosen = [m for m in chosen if m in heads]
        if not chosen:
            raise ConfigError(f"--encoders {encoders}: its CLIP heads project none of the modalities of the data")
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    for enc, _ in loaded.values():
        enc.to(device)
    for obj in {id(o): o for o in heads.values()}.values():
        obj.to(device)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    # the spec itself, not its file list: the loader then reads the counts from the manifest
    spec = [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)
    try:
        src = SourceConfig(shards=spec, modalities=chosen, label=label, **split)
    except ValueError as e:
        raise ConfigError(f"--data {data}: {e}") from None
    share = None if limit is None else -(-limit // world)
    if share is not None:
        batch_size = min(batch_size, share)  # no decoding or forward passes past the limit
    with tempfile.TemporaryDirectory() as ledger:
        cfg = LoaderConfig(batch_size=batch_size, num_workers=num_workers, epochs=1, augment=False, ledger=ledger,
                           interleave=1)
        loader = StreamingLoader({"data": src}, cfg, {m: mod.cfg for m, (_, mod) in loaded.items()}, rank=rank,
                                 world_size=world)
        rows: dict[str, list[np.ndarray]] = {m: [] for m in chosen}
        labels: list[np.ndarray] = []
        # a held-out part's size is known only once read: the limit, if any, bounds it
        total = share if split else min(shardset.total // world, share or shardset.total)
        bar = _bar(total, progress and rank == 0)
        seen = 0
        with torch.no_grad():
            for batch in loader:
                if share is not None and seen >= share:
                    break
                seen += len(batch["__key__"])
                batch = to_device(batch, device)
                for m in chosen:
                    rows[m].append(_rows(space, m, batch, loaded[m][0], heads.get(m)))
                if label:
                    labels.append(batch["cls"].cpu().numpy())
                bar.update(len(batch["__key__"]))
        bar.close()
        names = [k for line in _lines(ledger, rank) for k in json.loads(line)["keys"]][:seen]
    local = {"x": {m: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for m, v in rows.items()},
             "names": names, "labels": np.concatenate(labels) if labels else None}
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    else:
        parts = [local]
    return _assemble(parts, chosen, shardset, label)


def _lines(ledger: str, rank: int) -> list[str]:
    from pipeline.data.ledger import ledger_path

    path = ledger_path(ledger, rank)
    return [ln for ln in path.read_text().splitlines() if ln] if path.is_file() else []


def _rows(space: str, m: str, batch: dict, enc, head) -> np.ndarray:
    """[B, D] float32 rows of one batch of modality ``m``."""
    from pipeline import registry

    if space == "raw":
        x = batch[m]
        if isinstance(x, dict):  # token ids are no vector; text's raw input is its string
            return np.zeros((len(batch["__key__"]), 0), np.float32)
        return registry.modality(m).raw_features(x.float().cpu().numpy())
    if space == "clip":
        return head.features(batch, m).float().cpu().numpy()
    return enc.embed(batch[m]).float().cpu().numpy()


def _assemble(parts: list[dict], chosen: list[str], shardset, label) -> Embedding:
    """Rows of every process in shard order, with keys, positions, labels and paired texts."""
    from pipeline.data.loader import shard_name

    by_name = {shard_name(s.path): s.path for s in shardset.shards}
    order = {shard_name(s.path): i for i, s in enumerate(shardset.shards)}
    names = [n for p in parts for n in p["names"]]
    meta = _metadata(shardset, {n.split(":", 2)[1] for n in names})
    x = {m: np.concatenate([p["x"][m] for p in parts if len(p["names"])]) if names else np.zeros((0, 0), np.float32)
         for m in chosen}
    y = np.concatenate([p["labels"] for p in parts if p["labels"] is not None]) if label and names else None
    where, keys, texts = [], [], []
    for n in names:
        _, shard, key = n.split(":", 2)
        index, text = meta[(shard, key)]
        where.append((by_name[shard], index))
        keys.append(key)
        texts.append(text)
    perm = sorted(range(len(names)), key=lambda i: (order[shard_name(where[i][0])], where[i][1]))
    has_text = any(t is not None for t in texts)
    feats = {m: Features(x=x[m][perm], keys=[keys[i] for i in perm], labels=None if y is None else y[perm],
                         texts=[texts[i] or "" for i in perm] if has_text else None) for m in chosen}
    return Embedding(feats, [where[i] for i in perm])


def _metadata(shardset, used: set[str]) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(shard file name, key) → (position in shard, paired caption) from a pass over the small members."""
    from pipeline.data.loader import shard_name
    from pipeline.data.shards import iter_samples

    out = {}
    for s in shardset.shards:
        if shard_name(s.path) not in used:
            continue
        for sample in iter_samples(s.path, exts={"txt"}):
            raw = sample.get("txt")
            out[(shard_name(s.path), sample["__key__"])] = (sample["__index__"],
                                                          raw.decode("utf-8", "replace") if raw else None)
    return out


def _bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="embed", unit="sample", dynamic_ncols=True)


# ---------------------------------------------------------------- cache


def _cache_file(cache_dir, dirs: dict, chosen: list[str], shardset, settings: dict) -> Path:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    weights_matter = settings["space"] != "raw" and not settings["random_init"]
    for m in sorted(chosen):
        h.update(m.encode())
        files = sorted(p for p in dirs[m].rglob("*") if p.is_file())
        for f in files if weights_matter else [f for f in files if f.suffix == ".json" or f.name.startswith("tok")]:
            h.update(f.name.encode())
            h.update(_file_hash(f).encode())
    heads = dirs[chosen[0]].parent.parent / "heads"
    if settings["space"] == "clip" and heads.is_dir():
        for f in sorted(p for p in heads.rglob("*") if p.is_file()):
            h.update(_file_hash(f).encode())
    for s in shardset.shards:
        h.update((s.sha256 or _file_hash(Path(s.path))).encode())
    return Path(cache_dir) / f"embed-{h.hexdigest()[:24]}.safetensors"


def _file_hash(path: Path) -> str:
    from pipeline.data.shards import sha256_file

    return sha256_file(path)


def _write(path: Path, emb: Embedding) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{m}.x": np.ascontiguousarray(f.x) for m, f in emb.features.items()}
    first = next(iter(emb.features.values()))
    if first.labels is not None:
        tensors["labels"] = first.labels
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    side = {"modalities": list(emb.features), "keys": first.keys, "texts": first.texts,
            "where": [list(w) for w in emb.where]}
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(side))
    os.replace(tmp, path.with_suffix(".json"))


def _read(path: Path) -> Embedding:
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    side = json.loads(path.with_suffix(".json").read_text())
    feats = {m: Features(tensors[f"{m}.x"], side["keys"], tensors.get("labels"), side["texts"]) for m in side["modalities"]}
    return Embedding(feats, [(w[0], int(w[1])) for w in side["where"]])


# ---------------------------------------------------------------- the command


def add_arguments(parser) -> None:
    parser.add_argument("--encoders", required=True, metavar="DIR",
                        help="pretrain stage directory, exported directory, or a stock transformers directory")
    parser.add_argument("--data", required=True, nargs="+", metavar="SHARDS", help="shard folder, manifest or tar files")
    parser.add_argument("--out", required=True, metavar="FILE", help="features (.safetensors); keys go beside it as .json")
    parser.add_argument("--space", default="encoder", choices=SPACES, help="pooled encoder features, CLIP space, or raw input")
    parser.add_argument("--modalities", default=None, help="comma-separated (default: every modality the samples hold)")
    parser.add_argument("--label-key", default="cls", help="shard key of integer labels (default: cls)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)


def run(args) -> int:
    """``selfsup embed``: write ``<out>`` (``<modality>.x`` [N, D] per modality, ``labels``) and
    ``<out stem>.json`` (keys, texts, shard positions)."""
    accelerator = _accelerator()
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: features are written as safetensors; name the file *.safetensors")
    data = args.data if len(args.data) > 1 else args.data[0]
    mods = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    emb = embed(args.encoders, data, modalities=mods, space=args.space, label_key=args.label_key or None,
                batch_size=args.batch_size, num_workers=args.num_workers, accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        _write(out, emb)
        dims = ", ".join(f"{m} {f.x.shape[1]}" for m, f in emb.features.items())
        print(f"{out}: {len(emb.where)} samples ({dims}); keys in {out.with_suffix('.json')}")
    return 0


def _accelerator():
    """An Accelerator when launched with several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def embed_strings(encoders: str | Path, texts: list[str], *, space: str = "clip", random_init: bool = False,
                  seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """[N, D] features of plain strings (zero-shot prompts) with the text encoder of ``encoders``,
    preprocessed as the text shards are."""
    import torch

    loaded = load_encoders(encoders, random_init=random_init, seed=seed)
    if "text" not in loaded:
        raise ConfigError(f"--encoders {encoders}: no text encoder to embed class names with")
    enc, mod = loaded["text"]
    head = (clip_projections(encoders, {m: e for m, (e, _) in loaded.items()}, random_init=random_init,
                             seed=seed).get("text") if space == "clip" else None)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = {"text": mod.collate([mod.transform(t, None) for t in texts[i:i + batch_size]])}
            out.append(_rows(space, "text", batch | {"__key__": texts[i:i + batch_size]}, enc, head))
    return np.concatenate(out) if out else np.zeros((0, enc.hidden_size), np.float32)
