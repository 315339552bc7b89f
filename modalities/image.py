"""Images: PNG / JPEG / WebP bytes → float tensors ``[B, C, H, W]`` normalized per channel.

Augmentation is random-resized-crop + horizontal flip, done on the PIL image in one resampling
call (crop box and resize together), which keeps per-sample cost to a few microseconds on small
images, then, where asked, colour jitter (brightness, contrast, saturation, torchvision's
``ColorJitter`` factors in a random order) on the uint8 pixels; normalization happens once per batch. The encoder is a ViT over square patches
(``pipeline.encoders.base``).
"""

from __future__ import annotations

import io
import math
import random
import re
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from modalities.base import Modality as Base
from modalities.base import ModalityConfig
from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.vit import ViTEncoder

_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageConfig(ModalityConfig):
    size: int = 224
    channels: int = 3
    #: random-resized-crop area range and aspect-ratio range (train only)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    #: colour jitter (train only): each factor is drawn from [1 - x, 1 + x]; 0 leaves it out
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    #: chance that a sample is jittered at all (SimCLR's 0.8)
    jitter_p: float = Field(0.8, ge=0, le=1)
    #: per-channel normalization; None means 0.5 for every channel
    mean: list[float] | None = None
    std: list[float] | None = None
    #: key written by ``encode`` for images that are not already encoded files
    write_format: str = "png"
    #: largest decoded image (width × height) accepted; a small file can decode to gigabytes
    max_pixels: int = Field(64_000_000, ge=1)


class Modality(Base):
    name = "image"
    extensions = ("jpg", "jpeg", "png", "webp")
    Config = ImageConfig
    augment_keys = frozenset({"crop_scale", "crop_ratio", "hflip", "brightness", "contrast", "saturation", "jitter_p"})
    free_keys = augment_keys | {"write_format", "max_pixels"}

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
        img = _plain_png(data, self.cfg.max_pixels)
        if img is None:
            img = _open(data, ext, self.cfg.max_pixels)
        return img if img.mode == self._mode else img.convert(self._mode)

    def transform(self, img: Image.Image, rng: random.Random | None) -> torch.Tensor:
        size = self.cfg.size
        if rng is None:
            box = _center_box(img.width, img.height)
        else:
            box = _random_box(img.width, img.height, self.cfg.crop_scale, self.cfg.crop_ratio, rng)
        flip = rng is not None and self.cfg.hflip and rng.random() < 0.5
        # A writable buffer of the pixels; numpy reshapes it for a fraction of the cost of a
        # tensor view, and ``from_numpy`` shares the memory.
        arr = np.frombuffer(bytearray(_resized_pixels(img, size, box, flip)), np.uint8).reshape(size, size, -1)
        c = self.cfg
        if rng is not None and (c.brightness or c.contrast or c.saturation) and rng.random() < c.jitter_p:
            arr = _jitter(arr, c.brightness, c.contrast, c.saturation, rng)
        return torch.from_numpy(arr)  # [H, W, C] uint8

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(items).permute(0, 3, 1, 2).float()  # [B, C, H, W]
        return (x - self._mean) / self._std

    def image_processor(self):
        """A stock transformers ``ViTImageProcessor`` doing this modality's eval preprocessing
        (bilinear resize to ``size``, ``/255``, per-channel normalization) on RGB input, as
        ``transformers.pipeline`` hands it; one-channel encoders take RGB through luminance
        weights folded into their patch embedding (``pipeline.evaluators._stock_head``). It resizes
        the whole image: a non-square image is squeezed where the pipeline center-crops it."""
        from transformers import ViTImageProcessor

        c = self.cfg
        mean = (c.mean or [0.5] * c.channels) * (3 if c.channels == 1 else 1)
        std = (c.std or [0.5] * c.channels) * (3 if c.channels == 1 else 1)
        return ViTImageProcessor(do_resize=True, size={"height": c.size, "width": c.size}, resample=Image.BILINEAR,
                                 do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=mean,
                                 image_std=std)

    def encoder(self, cfg: EncoderConfig | None = None) -> ViTEncoder:
        """A ViT over ``size``×``size`` images of ``channels`` channels; ``cfg.patch_size`` must divide ``size``."""
        return ViTEncoder(cfg or EncoderConfig(), (self.cfg.size, self.cfg.size), self.cfg.channels)


#: PIL's C core has the calls the fast path makes (they are not public API: another Pillow may
#: lack them, and then every image takes the public path)
_CORE_OK = all(hasattr(x, a) for x, a in ((Image.core, "raw_encoder"), (Image.core, "new"))) and \
    hasattr(Image.core.new("L", (1, 1)), "resize")


def _resized_pixels(img: Image.Image, size: int, box: tuple, flip: bool) -> bytes:
    """Raw pixels of ``img`` cropped to ``box``, resized to ``size``×``size`` (bilinear) and optionally
    mirrored. For L and RGB images the work goes straight to PIL's C core: on small images the
    Python side of ``resize``, ``transpose`` and ``tobytes`` (argument checks, an ``Image`` per
    step, encoder lookup) costs several times the resampling itself. The result is the same as
    ``img.resize(...).transpose(...).tobytes()``, which other modes go through."""
    if img.mode not in ("L", "RGB") or (box == (0, 0, *img.size) and img.size == (size, size)) or not _CORE_OK:
        out = img.resize((size, size), Image.BILINEAR, box=box)
        return (out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out).tobytes()
    img.load()
    core = img.im.resize((size, size), Image.BILINEAR, box)
    if flip:
        core = core.transpose(Image.FLIP_LEFT_RIGHT)
    encoder = Image.core.raw_encoder(img.mode, img.mode)
    encoder.setimage(core, (0, 0, size, size))
    chunks, status = [], 0
    while not status:
        _, status, chunk = encoder.encode(max(1 << 16, size * 4))
        chunks.append(chunk)
    if status < 0:
        raise RuntimeError(f"encoder error {status} reading resized pixels")
    return b"".join(chunks)


#: luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601)
_LUMA = np.array([0.2989, 0.587, 0.114], np.float32)


def _jitter(arr: np.ndarray, brightness: float, contrast: float, saturation: float,
            rng: random.Random) -> np.ndarray:
    """Brightness (scale), contrast (blend with the mean grey level) and saturation (blend with
    the grey image; RGB only) of ``arr`` [H, W, C] uint8, each factor uniform in [1 - x, 1 + x],
    applied in a random order; the result is clipped to [0, 255] after each, as torchvision does."""
    ops = [(k, rng.uniform(max(0.0, 1 - x), 1 + x)) for k, x in
           (("b", brightness), ("c", contrast), ("s", saturation)) if x and (k != "s" or arr.shape[2] == 3)]
    rng.shuffle(ops)
    x = arr.astype(np.float32)
    for kind, f in ops:
        grey = x if x.shape[2] == 1 else (x @ _LUMA)[..., None]
        if kind == "b":
            x = x * f
        elif kind == "c":
            x = f * x + (1 - f) * float(grey.mean())
        else:
            x = f * x + (1 - f) * grey
        x = x.clip(0, 255)
    return x.round().astype(np.uint8)


def _too_large(ext: str, width: int, height: int, limit: int) -> ValueError:
    return ValueError(f"{ext} decodes to {width}x{height} = {width * height / 1e6:.1f} megapixels, over "
                      f"image.max_pixels {limit} (raise it if such images are meant to be read)")


def _open(data: bytes, ext: str, max_pixels: int) -> Image.Image:
    """Any image file PIL reads, fully loaded; ``ValueError`` saying why not otherwise. The size is
    checked from the header before any pixel is decoded (PIL's own bomb check only warns)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides
            img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise _too_large(ext, img.width, img.height, max_pixels)
        img.load()
    except Image.DecompressionBombError:
        raise ValueError(f"{ext} is larger than PIL reads (Image.MAX_IMAGE_PIXELS × 2); image.max_pixels is "
                         f"{max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        # PIL names its in-memory buffer ("<_io.BytesIO object at 0x…>"), which tells a reader nothing
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise ValueError(f"cannot decode {ext}: {reason}") from None
    return img


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: (bit depth, colour type) → PIL mode (= raw mode) of the PNGs ``_plain_png`` decodes
_PLAIN_MODES = {(8, 0): "L", (8, 2): "RGB", (8, 4): "LA", (8, 6): "RGBA"}
#: ancillary chunks PIL records in ``info`` without changing the decoded pixels
_INERT_CHUNKS = frozenset({b"gAMA", b"sRGB", b"pHYs", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"cHRM",
                           b"iCCP", b"bKGD", b"sBIT", b"eXIf"})


def _plain_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """A non-interlaced 8-bit PNG without palette or transparency, decoded by PIL's own zlib/unfilter
    decoder from the concatenated IDAT data: the same pixels as ``Image.open`` + ``load`` without its
    file-object parsing, which costs more than the decoding itself on small images. None for any
    other PNG, or anything unusual (bad CRC, truncation, huge size), which ``_open`` then handles,
    errors included."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    mode = _PLAIN_MODES.get((depth, colour))
    if width * height > max_pixels:
        raise _too_large("png", width, height, max_pixels)
    limit = Image.MAX_IMAGE_PIXELS  # above it PIL warns or refuses: leave that to PIL
    if mode is None or compression or filtering or interlace or not width * height or \
            limit is not None and width * height > limit:
        return None
    idat = _idat(data)
    if idat is None:
        return None
    try:
        return Image.frombytes(mode, (width, height), idat, "zip", mode)
    except (ValueError, OSError):
        return None


def _idat(data: bytes) -> bytes | None:
    """The image data of a PNG whose chunks are IHDR, inert chunks, one run of IDAT, inert chunks,
    IEND, with the CRCs that PIL checks (those before the image data) intact; None otherwise."""
    pos, end, parts = 8, len(data), []
    after_idat = False  # an IDAT run has ended: another IDAT would be one PIL never reads
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body, crc = pos + 8, pos + 8 + length
        if crc + 4 > end:
            return None
        if kind == b"IDAT":
            if after_idat:
                return None
            parts.append(data[body:crc])
        elif kind == b"IEND":
            return b"".join(parts) if parts else None
        elif parts:
            if kind not in _INERT_CHUNKS:
                return None
            after_idat = True
        elif (kind == b"IHDR") != (pos == 8) or kind != b"IHDR" and kind not in _INERT_CHUNKS or \
                zlib.crc32(data[pos + 4:crc]) != int.from_bytes(data[crc:crc + 4], "big"):
            return None  # IHDR not first, a chunk that is not inert, or a CRC PIL would refuse
        pos = crc + 4
    return None


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
