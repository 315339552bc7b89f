"""Which encoders a directory holds and how to load them: a pretrain stage directory
(``encoders/<modality>/`` + ``heads/``), an exported directory of ``<modality>/`` encoders, or one
plain stock transformers directory; and the CLIP heads' projections of a stage directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from modalities.base import Modality
    from pipeline.encoders.base import Encoder


def encoder_dirs(path: str | Path) -> dict[str, Path]:
    """modality → encoder directory, for a stage directory (``encoders/<modality>/``), an exported
    directory of ``<modality>/`` encoder directories, or one plain stock transformers directory."""
    from pipeline.encoders import saved

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--encoders {path}: no such directory")
    root = path / "encoders" if (path / "encoders").is_dir() else path
    if (root / "config.json").is_file():  # one encoder directory, ours or stock
        dirs = [root]
    else:
        dirs = sorted(d for d in root.iterdir() if d.is_dir() and ((d / saved.SETTINGS).is_file()
                                                                   or (d / "config.json").is_file()))
    if not dirs:
        raise ConfigError(f"--encoders {path}: no encoder directories (neither encoders/<modality>/, "
                          "<modality>/ with selfsup.json, nor a config.json)")
    out: dict[str, Path] = {}
    for d in dirs:
        info = saved.settings(d)
        modality = info["modality"] if info is not None else _stock_modality(d)
        if modality in out:
            raise ConfigError(f"--encoders {path}: two {modality} encoders ({out[modality]} and {d})")
        out[modality] = d
    return out


def _stock_modality(path: Path) -> str:
    from pipeline.encoders import saved

    mod, _ = saved.load(path)
    return mod.name


def load_encoders(path: str | Path, *, random_init: bool = False, seed: int = 0) -> dict[str, tuple[Encoder, Modality]]:
    """modality → (frozen encoder in eval mode, its modality with the saved settings). With
    ``random_init`` the same architecture and settings, weights drawn fresh from ``seed``."""
    import torch

    from pipeline.encoders import saved

    out = {}
    for modality, d in encoder_dirs(path).items():
        mod, enc = saved.load(d)
        if random_init:
            torch.manual_seed(seed)
            enc = mod.encoder(enc.cfg.model_copy(update={"init_from": None}))
        enc.eval().requires_grad_(False)
        out[modality] = (enc, mod)
    return out


def clip_projections(path: str | Path, encoders: dict[str, Encoder], *, random_init: bool = False, seed: int = 0):
    """modality → the CLIP objective holding its projection, from ``<path>/heads/clip*``; with
    ``random_init`` the same heads with fresh weights (the untrained twin's)."""
    import torch

    from pipeline import registry
    from pipeline.config import build
    from pipeline.encoders import saved

    heads = Path(path) / "heads"
    found = {}
    for d in sorted(heads.glob("*")) if heads.is_dir() else []:
        if not (d / saved.HEADS_SETTINGS).is_file():
            continue
        info = saved.heads_settings(d)
        if info["objective"] != "clip" or not all(m in encoders for m in info["modalities"]):
            continue
        towers = {m: encoders[m] for m in info["modalities"]}
        if random_init:
            module = registry.module("objective", "clip")
            torch.manual_seed(seed)
            objective = module.Objective(build(module.Config, info["config"], str(d)), towers, info["name"], seed).eval()
        else:
            objective = saved.load_heads(d, towers)
        for m in info["modalities"]:
            found.setdefault(m, objective)
    if not found:
        raise ConfigError(f"--encoders {path}: space 'clip' needs CLIP heads (heads/clip*/heads.json); there are none")
    return found
