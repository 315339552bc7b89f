"""The package's CLIP loader: ``load_clip(path)`` gives ``encode_image`` / ``encode_text`` /
``encode_audio`` from raw inputs, like an open_clip model, for every CLIP pair the pipeline makes.

``path`` may be a CLIP pretrain stage directory (``encoders/<modality>/`` + ``heads/clip*/``), the
same layout in an export (the audio–text pair), or an exported stock ``VisionTextDualEncoderModel``
directory with its image processor and tokenizer (the image–text pair). Inputs go through the
pipeline's eval preprocessing (each modality's ``transform`` without a random generator and its
``collate``; for the stock model, its saved processor, which the export configures to match);
outputs are L2-normalized features in the pair's joint space, float32 on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError

DUAL_ENCODER = "vision-text-dual-encoder"


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> StageClip | DualEncoderClip:
    """The CLIP model in ``path`` (stage layout or stock dual encoder), in eval mode on ``device``."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == DUAL_ENCODER:
        return DualEncoderClip(path, device)
    if (path / "heads").is_dir() and (path / "encoders").is_dir():
        return StageClip(path, device)
    if not path.exists():
        raise ConfigError(f"{path}: no such directory")
    raise ConfigError(f"{path}: not a CLIP model (neither encoders/ + heads/clip*/ nor a {DUAL_ENCODER} config.json)")


class _Clip:
    """What both layouts share: the open_clip-like entry points over ``encode(modality, items)``."""

    modalities: tuple[str, ...]
    path: Path

    def encode_image(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images (or image files) → [B, E]."""
        return self.encode("image", images)

    def encode_text(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Strings → [B, E]."""
        return self.encode("text", [texts] if isinstance(texts, str) else texts)

    def encode_audio(self, waves: Sequence[Any]) -> torch.Tensor:
        """Mono waveforms at the model's sample rate (1-D tensors or arrays), or audio files → [B, E]."""
        return self.encode("audio", waves)

    def encode(self, modality: str, items: Sequence[Any]) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ConfigError(f"{self.path}: this CLIP model pairs {' and '.join(self.modalities)}, not {modality}")


class StageClip(_Clip):
    """A pair saved in the stage layout: the towers via ``pipeline.encoders.saved``, the projections
    from the CLIP heads (the objective's own ``features``, so these are training-time features)."""

    def __init__(self, path: Path, device="cpu"):
        from pipeline.encoders import saved

        self.path, self.device = path, torch.device(device)
        heads = sorted(p for p in (path / "heads").glob("clip*") if p.is_dir())
        if not heads:
            raise ConfigError(f"{path}/heads: no clip* heads directory (not a CLIP stage)")
        info = saved.heads_settings(heads[0])
        self.modalities = tuple(info["modalities"])
        self.mods, encoders = {}, {}
        for m in self.modalities:
            folder = path / "encoders" / m
            if not folder.is_dir():
                raise ConfigError(f"{folder}: missing; the CLIP heads {heads[0]} pair {' and '.join(self.modalities)}")
            self.mods[m], encoders[m] = saved.load(folder)
        self.objective = saved.load_heads(heads[0], encoders).to(self.device).eval()

    def encode(self, modality: str, items: Sequence[Any]) -> torch.Tensor:
        self._check(modality)
        mod = self.mods[modality]
        return self.encode_batch(modality, mod.collate([mod.transform(_decoded(mod, x), None) for x in items]))

    @torch.no_grad()
    def encode_batch(self, modality: str, batch) -> torch.Tensor:
        """A collated batch (what the loader yields for ``modality``) → [B, E]."""
        batch = {k: v.to(self.device) for k, v in batch.items()} if isinstance(batch, dict) else batch.to(self.device)
        return self.objective.features({modality: batch}, modality).float().cpu()


def _decoded(mod, item):
    """A raw item as the modality's ``decode`` would give it: files are read and decoded; PIL images
    take the modality's colour mode; arrays become tensors."""
    if isinstance(item, (str, Path)) and mod.name != "text":
        try:
            ext, data = mod.encode(Path(item))
            return mod.decode(data, ext)
        except ValueError as e:  # the message names the file once
            raise ValueError(str(e) if str(item) in str(e) else f"{item}: {e}") from None
    if mod.name == "image":
        mode = "L" if mod.cfg.channels == 1 else "RGB"
        return item if item.mode == mode else item.convert(mode)
    if mod.name == "audio":
        return torch.as_tensor(item, dtype=torch.float32).flatten()
    return item


class DualEncoderClip(_Clip):
    """An exported stock ``VisionTextDualEncoderModel`` with the image processor and tokenizer saved beside it."""

    modalities = ("image", "text")

    def __init__(self, path: Path, device="cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

        self.path, self.device = path, torch.device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(path))
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: the dual encoder needs its saved image processor and tokenizer ({e})") from None
        self.model = VisionTextDualEncoderModel.from_pretrained(str(path)).to(self.device).eval()
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def encode(self, modality: str, items: Sequence[Any]) -> torch.Tensor:
        self._check(modality)
        if modality == "image":

            images = [_open_image(x) if isinstance(x, (str, Path)) else x.convert("RGB") for x in items]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            out = self.model.get_image_features(pixel_values=pixels)
        else:
            tok = self.tokenizer(list(items), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1).cpu()

    def embed_shards(self, data: str | list[str], modalities: Sequence[str], batch_size: int = 64,
                     progress: bool = True):
        """``modalities`` of every sample of the shard set ``data``, in shard order, through this model:
        an ``Embedding`` as ``pipeline.evaluation.embed`` gives one for a stage directory. The stock
        model has no pipeline modality settings to feed the loader, so samples are decoded here and
        go through ``encode``, the saved processor and tokenizer that embed ``retrieve``'s queries.
        A sample lacking one of ``modalities`` stops the pass, naming it, as the loader does."""
        from tqdm.auto import tqdm

        from pipeline import registry
        from pipeline.data.shards import iter_samples, open_shards
        from pipeline.evaluation.embed import Embedding
        from pipeline.evaluators.base import Features

        for m in modalities:
            self._check(m)
        shardset = open_shards(data)
        if not shardset.shards:
            raise ConfigError(f"--data {data}: no shards")
        mods = {m: registry.modality(m)() for m in modalities}  # decoding only: no size, no tokenizer
        exts = {e for mod in mods.values() for e in mod.extensions}
        rows: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
        keys, where, items = [], [], {m: [] for m in modalities}

        def flush():
            for m in modalities:
                if items[m]:
                    rows[m].append(self.encode(m, items[m]))
                items[m] = []

        bar = tqdm(total=shardset.total, disable=not progress, desc="embed", unit="sample", dynamic_ncols=True)
        for shard in shardset.shards:
            for sample in iter_samples(shard.path, exts=exts):
                for m, mod in mods.items():
                    ext = mod.pick(sample)
                    if ext is None:
                        raise ConfigError(f"{shard.path}: sample {sample['__key__']!r}: no {m} "
                                          f"(looked for {', '.join(mod.extensions)})")
                    try:
                        items[m].append(mod.decode(sample[ext], ext))
                    except ValueError as e:
                        raise ConfigError(f"{shard.path}: sample {sample['__key__']!r}: {e}") from None
                keys.append(sample["__key__"])
                where.append((shard.path, sample["__index__"]))
                if len(keys) % batch_size == 0:
                    flush()
                bar.update(1)
        flush()
        bar.close()
        return Embedding({m: Features(torch.cat(rows[m]).numpy() if rows[m] else np.zeros((0, 0), np.float32), list(keys))
                          for m in modalities}, where)


def _open_image(file) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{file}: not an image file PIL can read") from None
