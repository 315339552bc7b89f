"""Images: PNG / JPEG / WebP bytes → float tensors ``[B, C, H, W]`` normalized per channel.

Augmentation is random-resized-crop + horizontal flip, done on the PIL image in one resampling
call (crop box and resize together), which keeps per-sample cost to a few microseconds on small
images; normalization happens once per batch. The encoder is a ViT over square patches
(``pipeline.encoder``).
"""

from __future__ import annotations

import io
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.encoder import EncoderConfig, ViTEncoder
from pipeline.modality import Modality as Base
from pipeline.modality import ModalityConfig

_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageConfig(ModalityConfig):
    size: int = 224
    channels: int = 3
    #: random-resized-crop area range and aspect-ratio range (train only)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    #: per-channel normalization; None means 0.5 for every channel
    mean: list[float] | None = None
    std: list[float] | None = None
    #: key written by ``encode`` for images that are not already encoded files
    write_format: str = "png"


class Modality(Base):
    name = "image"
    extensions = ("jpg", "jpeg", "png", "webp")
    Config = ImageConfig

    def __init__(self, cfg: ImageConfig | None = None):
        super().__init__(cfg)
        c = self.cfg
        mean = c.mean or [0.5] * c.channels
        std = c.std or [0.5] * c.channels
        self._mean = torch.tensor(mean).view(1, -1, 1, 1) * 255.0
        self._std = torch.tensor(std).view(1, -1, 1, 1) * 255.0
        self._mode = "L" if c.channels == 1 else "RGB"

    def encode(self, value: Any) -> tuple[str, bytes]:
        if isinstance(value, (str, Path)):
            ext = Path(value).suffix.lstrip(".").lower()
            if ext not in _FORMATS:
                raise ValueError(f"{value}: not an image file ({', '.join(_FORMATS)})")
            return ("jpg" if ext == "jpeg" else ext), Path(value).read_bytes()
        if isinstance(value, (bytes, bytearray)):
            return self.cfg.write_format, bytes(value)
        if isinstance(value, np.ndarray):
            value = Image.fromarray(value)
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format=_FORMATS[self.cfg.write_format])
            return self.cfg.write_format, buf.getvalue()
        raise ValueError(f"cannot encode {type(value).__name__} as an image")

    def decode(self, data: bytes, ext: str) -> Image.Image:
        if not data:
            raise ValueError(f"empty {ext} (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            # PIL names its in-memory buffer ("<_io.BytesIO object at 0x…>"), which tells a reader nothing
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
            raise ValueError(f"cannot decode {ext}: {reason}") from None
        return img if img.mode == self._mode else img.convert(self._mode)

    def transform(self, img: Image.Image, rng: random.Random | None) -> torch.Tensor:
        size = self.cfg.size
        if rng is None:
            box = _center_box(img.width, img.height)
        else:
            box = _random_box(img.width, img.height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
        out = img.resize((size, size), Image.BILINEAR, box=box)
        if rng is not None and self.cfg.hflip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(out)
        return torch.from_numpy(arr.reshape(size, size, -1).copy())  # [H, W, C] uint8

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(items).permute(0, 3, 1, 2).float()  # [B, C, H, W]
        return (x - self._mean) / self._std

    def encoder(self, cfg: EncoderConfig | None = None) -> ViTEncoder:
        """A ViT over ``size``×``size`` images of ``channels`` channels; ``cfg.patch_size`` must divide ``size``."""
        return ViTEncoder(cfg or EncoderConfig(), (self.cfg.size, self.cfg.size), self.cfg.channels)


def _center_box(w: int, h: int) -> tuple[float, float, float, float]:
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return (left, top, left + side, top + side)


def _random_box(w: int, h: int, scale, ratio, rng: random.Random) -> tuple[float, float, float, float]:
    """Inception-style crop: area fraction in ``scale``, log-uniform aspect ratio in ``ratio``."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (left, top, left + cw, top + ch)
    return _center_box(w, h)
