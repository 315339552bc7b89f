"""A saved encoder directory that describes itself, and the objective heads saved beside it.

``<stage>/encoders/<modality>/`` holds what the stock class's ``save_pretrained`` writes (plus the
tokenizer for text) and ``selfsup.json``: the modality, the encoder settings (``EncoderConfig``)
and the modality settings it was trained with. ``load(dir)`` rebuilds the encoder and its
modality from the directory alone. Inside a recipe, ``merge`` makes the saved settings the
defaults of an ``init_from`` encoder: what the recipe sets explicitly must agree with them, except
the settings that change neither the weights nor the features' meaning (``FREE_ENCODER_KEYS``,
each modality's ``free_keys``). Augmentation (``augment_keys``) is not inherited: it is the new
stage's own choice.

A plain ``save_pretrained`` directory without ``selfsup.json`` (a ViT or BERT from elsewhere)
still loads: inside a recipe its wrapper settings come from the recipe; on its own they are read
from its ``config.json`` (``load``).

``<stage>/heads/<objective>/`` holds ``heads.safetensors`` (the objective's own weights: CLIP
projections and logit scale, the MAE decoder, the MLM head, data2vec's teacher) and
``heads.json`` (objective kind and resolved settings), so a later stage continues the objective
(``objectives: {clip: {init_from: DIR}}``) and evaluation, export and retrieval use the heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import registry
from pipeline.config import ConfigError, build, dump
from pipeline.encoders.base import EncoderConfig

if TYPE_CHECKING:
    from modalities.base import Modality, ModalityConfig
    from pipeline.encoders.base import Encoder
    from pipeline.objectives.base import Objective

SETTINGS = "selfsup.json"
HEADS_WEIGHTS, HEADS_SETTINGS = "heads.safetensors", "heads.json"
#: encoder settings that may differ from the saved ones: they shape no weight
FREE_ENCODER_KEYS = frozenset({"init_from", "dropout", "pooling"})
#: settings whose architecture effect is compared after resolving the preset
_ARCHITECTURE = ("patch_size", "mlp_ratio")


def save(encoder: Encoder, modality: Modality, path: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``encoder`` as a stock ``save_pretrained`` directory plus ``selfsup.json``."""
    path = Path(path)
    encoder.save_pretrained(path, **({"state_dict": state_dict} if state_dict is not None else {}))
    assets = modality.save_assets(path)
    settings = dump(modality.cfg) | {k: "." for k in assets}  # "." is the encoder directory itself
    (path / SETTINGS).write_text(json.dumps({
        "version": 1, "modality": modality.name, "family": encoder.family,
        "encoder": dump(encoder.cfg.model_copy(update={"init_from": None})), "modality_settings": settings,
    }, indent=1) + "\n")
    return path


def settings(path: str | Path) -> dict | None:
    """The ``selfsup.json`` of an encoder directory, or None for a plain stock directory."""
    file = Path(path) / SETTINGS
    if not file.is_file():
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{path}: not an encoder directory (no {SETTINGS}, no config.json)")
        return None
    data = json.loads(file.read_text())
    if data.get("version") != 1:
        raise ConfigError(f"{file}: version {data.get('version')!r} is not one this pipeline reads (1)")
    return data


def merge(path: str | Path, ecfg: EncoderConfig, mcfg: ModalityConfig | None, modality: str,
          where: str) -> tuple[EncoderConfig, ModalityConfig | None]:
    """(encoder settings, modality settings) of an ``init_from`` encoder in a recipe: the saved ones,
    with what the recipe sets explicitly, which must agree unless it is free."""
    saved = settings(path)
    if saved is None:
        return ecfg, mcfg
    file = Path(path) / SETTINGS
    if saved["modality"] != modality:
        raise ConfigError(f"{where}.init_from: {path} holds a {saved['modality']} encoder, not a {modality} one")
    base = build(EncoderConfig, saved["encoder"], str(file))
    for key in sorted(ecfg.model_fields_set - FREE_ENCODER_KEYS):
        trial = base.model_copy(update={key: getattr(ecfg, key)})
        if _architecture(trial, where) != _architecture(base, where):
            raise ConfigError(f"{where}.{key}: {getattr(ecfg, key)!r} disagrees with {getattr(base, key)!r} in {file}; "
                              f"drop the setting or make it {getattr(base, key)!r}")
    merged = base.model_copy(update={k: getattr(ecfg, k) for k in ecfg.model_fields_set})
    return merged, _merge_modality(saved, Path(path), mcfg, modality, file)


def _architecture(cfg: EncoderConfig, where: str) -> tuple:
    return (tuple(sorted(cfg.resolved(where).items())), *(getattr(cfg, k) for k in _ARCHITECTURE))


def _merge_modality(saved: dict, path: Path, mcfg, modality: str, file: Path):
    cls = registry.modality(modality)
    # augmentation is the new stage's choice: the saved encoder's is not carried over
    values = {k: str(path) if v == "." else v for k, v in saved["modality_settings"].items() if k not in cls.augment_keys}
    base = build(cls.Config, values, f"{file}: modality_settings")
    if mcfg is None:
        return base
    for key in sorted(mcfg.model_fields_set - cls.free_keys):
        if getattr(mcfg, key) != getattr(base, key):
            raise ConfigError(f"modalities.{modality}.{key}: {getattr(mcfg, key)!r} disagrees with "
                              f"{getattr(base, key)!r} the encoder {path} was trained with ({file})")
    return base.model_copy(update={k: getattr(mcfg, k) for k in mcfg.model_fields_set})


def load(path: str | Path, ecfg: EncoderConfig | None = None, mcfg: ModalityConfig | None = None,
         where: str = "encoder") -> tuple[Modality, Encoder]:
    """(modality, encoder with the saved weights) from an encoder directory. Settings given here
    are checked against the saved ones as in ``merge``; a plain stock directory takes its modality
    and wrapper settings from its ``config.json`` unless they are given."""
    path = Path(path)
    saved = settings(path)
    if saved is None:
        modality, ecfg, mcfg = _stock(path, ecfg, mcfg)
    else:
        modality = saved["modality"]
        ecfg, mcfg = merge(path, ecfg or EncoderConfig(), mcfg, modality, where)
    mod = registry.modality(modality)(mcfg)
    return mod, mod.encoder(ecfg.model_copy(update={"init_from": str(path)}))


def _stock(path: Path, ecfg, mcfg) -> tuple[str, EncoderConfig, Any]:
    """Modality and settings of a stock transformers directory, read from its ``config.json``."""
    config = json.loads((path / "config.json").read_text())
    kind = config.get("model_type")
    dims = {"hidden_size": config.get("hidden_size"), "num_layers": config.get("num_hidden_layers"),
            "num_heads": config.get("num_attention_heads")}
    if "intermediate_size" in config and config.get("hidden_size"):
        dims["mlp_ratio"] = config["intermediate_size"] / config["hidden_size"]
    given = next((n for n in registry.names("modality") if isinstance(mcfg, registry.modality(n).Config)), None)
    if kind == "vit":
        modality = given or "image"
        size = config["image_size"]
        mcfg = mcfg or registry.modality("image").Config(size=size if isinstance(size, int) else size[0],
                                                         channels=config.get("num_channels", 3))
        dims["patch_size"] = config.get("patch_size", 16)
    elif kind in ("bert", "roberta"):
        modality = "text"
        mcfg = mcfg or registry.modality("text").Config(tokenizer=str(path))
    else:
        raise ConfigError(f"{path}: a {kind!r} model; this pipeline's encoders are ViT (image, audio) and BERT (text)")
    return modality, ecfg or EncoderConfig(**{k: v for k, v in dims.items() if v is not None}), mcfg


# ---------------------------------------------------------------- objective heads


def save_heads(objective: Objective, kind: str, path: str | Path, state_dict: dict) -> Path:
    """``heads.safetensors`` (the objective's own weights, ``state_dict`` relative to it) + ``heads.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path / HEADS_WEIGHTS))
    (path / HEADS_SETTINGS).write_text(json.dumps({
        "version": 1, "objective": kind, "name": objective.name, "modalities": list(objective.modalities),
        "config": dump(objective.cfg.model_copy(update={"init_from": None})),
    }, indent=1) + "\n")
    return path


def heads_settings(path: str | Path) -> dict:
    file = Path(path) / HEADS_SETTINGS
    if not file.is_file():
        raise ConfigError(f"{path}: no {HEADS_SETTINGS} (not a heads directory written by a pretrain stage)")
    return json.loads(file.read_text())


def load_heads_into(objective: Objective, kind: str, path: str | Path, where: str) -> None:
    """Copy the weights of a heads directory into ``objective`` (same kind, same shapes)."""
    from safetensors.torch import load_file

    info = heads_settings(path)
    if info["objective"] != kind:
        raise ConfigError(f"{where}.init_from: {path} holds {info['objective']} heads, this objective is {kind}")
    try:
        missing, unexpected = objective.load_state_dict(load_file(str(Path(path) / HEADS_WEIGHTS)), strict=False)
    except RuntimeError as e:  # mis-shaped weights
        raise ConfigError(f"{where}.init_from: {path}: {' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise ConfigError(f"{where}.init_from: {path}: heads do not fit this objective "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use the earlier stage's settings")


def load_heads(path: str | Path, encoders: dict[str, Encoder], seed: int = 0) -> Objective:
    """The objective a heads directory was saved from, rebuilt around ``encoders`` with its weights."""
    info = heads_settings(path)
    module = registry.module("objective", info["objective"])
    cfg = build(module.Config, info["config"], str(Path(path) / HEADS_SETTINGS))
    objective = module.Objective(cfg, encoders, info["name"], seed)
    load_heads_into(objective, info["objective"], path, f"heads {path}")
    return objective.eval()
