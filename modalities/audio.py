"""Audio: FLAC / WAV bytes → mono waveform at ``sample_rate`` → fixed-length crop → log-mel
batches ``[B, 1, n_mels, frames]``.

File I/O is soundfile (no ffmpeg needed); resampling is ``torchaudio.functional.resample`` and the
mel filterbank ``torchaudio.transforms.MelSpectrogram``, computed once per batch. Train-time
augmentation is, where asked, speed perturbation (the clip resampled by a factor drawn from
``speed_factors``, which changes tempo and pitch together as a shorter or longer vocal tract
would: ``torchaudio.functional.speed``), a random crop of long clips and a random time shift of
short ones inside the zero-padded window, then, where asked, a room: background noise over the
whole window (a power spectrum falling as 1/f^slope, at a signal-to-noise ratio drawn per clip)
and a gain, the noise floor and level every recording has and synthesized speech lacks, then
SpecAugment's frequency and time masks (bands of mel bins and runs of frames set to the normalized
mean, 0), drawn with the crop and put in once the batch's log-mel is computed. The encoder is a
ViT over log-mel patches (``LogMelEncoder``).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import soundfile as sf
import torch
from pydantic import Field, field_validator

from modalities.base import Modality as Base
from modalities.base import ModalityConfig
from pipeline.config import ConfigError
from pipeline.encoders.base import EncoderConfig
from pipeline.encoders.vit import ViTEncoder


class AudioConfig(ModalityConfig):
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    n_mels: int = 64
    n_fft: int = 400
    hop_length: int = 160
    #: log-mel normalization (AudioSet-style statistics; recompute for your data if far off)
    mean: float = -6.0
    std: float = 4.0
    #: SpecAugment (train only): this many bands of up to ``freq_mask_bins`` mel bins and runs of up
    #: to ``time_mask_frames`` frames masked per clip; 0 leaves them out
    freq_masks: int = Field(0, ge=0)
    freq_mask_bins: int = Field(8, ge=1)
    time_masks: int = Field(0, ge=0)
    time_mask_frames: int = Field(10, ge=1)
    #: speed perturbation (train only): each clip resampled by one of these factors, drawn uniformly
    #: (1.1 plays 10 % faster and higher); empty leaves it out. Factors on a 0.05 grid keep the
    #: resampling kernel short (0.9 is 16 kHz → 14.4 kHz, a ratio of 9 : 10)
    speed_factors: tuple[Annotated[float, Field(gt=0.5, lt=2.0)], ...] = ()
    #: background noise (train only): with probability ``noise_prob`` a clip gets noise over its whole
    #: window at a signal-to-noise ratio uniform in ``noise_snr_db`` (dB against the clip's own RMS),
    #: its power spectrum falling as 1/f^slope with the slope uniform in ``noise_slope`` (0 white,
    #: 1 pink, 2 brown)
    noise_prob: float = Field(0.0, ge=0, le=1)
    noise_snr_db: tuple[float, float] = (10.0, 40.0)
    noise_slope: tuple[Annotated[float, Field(ge=0, le=4)], Annotated[float, Field(ge=0, le=4)]] = (0.0, 2.0)
    #: gain (train only): every clip scaled by a factor uniform in dB in this range ((0, 0): none)
    gain_db: tuple[float, float] = (0.0, 0.0)
    #: key written by ``encode`` for raw arrays
    write_format: str = "flac"
    #: longest clip decoded; a long file would take its whole length in memory before the crop
    max_seconds: float = Field(600.0, gt=0)

    @field_validator("noise_snr_db", "noise_slope", "gain_db")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ConfigError(f"[low, high] needs low <= high, got {list(value)}")
        return value


class Modality(Base):
    name = "audio"
    extensions = ("flac", "wav")
    Config = AudioConfig
    augment_keys = frozenset({"freq_masks", "freq_mask_bins", "time_masks", "time_mask_frames", "speed_factors",
                              "noise_prob", "noise_snr_db", "noise_slope", "gain_db"})
    free_keys = augment_keys | {"write_format", "max_seconds"}

    def __init__(self, cfg: AudioConfig | None = None):
        super().__init__(cfg)
        self._mel = None

    @property
    def num_samples(self) -> int:
        return round(self.cfg.clip_seconds * self.cfg.sample_rate)

    @property
    def num_frames(self) -> int:
        return self.num_samples // self.cfg.hop_length + 1

    def encode(self, value: Any) -> tuple[str, bytes]:
        if isinstance(value, (str, Path)):
            ext = Path(value).suffix.lstrip(".").lower()
            if ext not in self.extensions:
                raise ValueError(f"{value}: not an audio file ({', '.join(self.extensions)})")
            return ext, Path(value).read_bytes()
        if isinstance(value, (tuple, list)) and len(value) == 2:
            wave, sr = value
            buf = io.BytesIO()
            sf.write(buf, np.asarray(wave, dtype=np.float32), int(sr), format=self.cfg.write_format.upper())
            return self.cfg.write_format, buf.getvalue()
        raise ValueError(f"cannot encode {type(value).__name__} as audio; give a path or (waveform, sample_rate)")

    def decode(self, data: bytes, ext: str) -> torch.Tensor:
        if not data:
            raise ValueError(f"empty {ext} (0 bytes)")
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                seconds = f.frames / f.samplerate if f.samplerate else 0.0
                if seconds > self.cfg.max_seconds:
                    raise ValueError(f"{ext} lasts {seconds:.1f} s, over audio.max_seconds {self.cfg.max_seconds:g}")
                wave, sr = f.read(dtype="float32", always_2d=True), f.samplerate
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise ValueError(f"cannot decode {ext}: {e}") from None
        if wave.shape[0] == 0:
            raise ValueError(f"{ext} holds no audio frames")
        mono = torch.from_numpy(wave.mean(axis=1))
        if sr != self.cfg.sample_rate:
            import torchaudio.functional as AF

            mono = AF.resample(mono, sr, self.cfg.sample_rate)
        return mono  # [T]

    def transform(self, wave: torch.Tensor, rng: random.Random | None) -> torch.Tensor:
        n = self.num_samples
        c = self.cfg
        if rng is not None and c.speed_factors:
            factor = rng.choice(c.speed_factors)
            if factor != 1.0:
                import torchaudio.functional as AF

                wave = AF.speed(wave, c.sample_rate, factor)[0]
        out = torch.zeros(n)
        if wave.numel() >= n:
            start = rng.randint(0, wave.numel() - n) if rng is not None else (wave.numel() - n) // 2
            out.copy_(wave[start : start + n])
            clip = out
        else:
            slack = n - wave.numel()
            start = rng.randint(0, slack) if rng is not None else slack // 2
            out[start : start + wave.numel()] = wave
            clip = wave
        if rng is None:
            return out
        out = self._room(out, clip, rng)
        if not (c.freq_masks or c.time_masks):
            return out
        masks = [(0, *_band(c.n_mels, c.freq_mask_bins, rng)) for _ in range(c.freq_masks)]
        masks += [(1, *_band(self.num_frames, c.time_mask_frames, rng)) for _ in range(c.time_masks)]
        return Masked(out, tuple(masks))

    def _room(self, out: torch.Tensor, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """``out`` (the window) with the drawn noise (scaled to ``clip``, the sound in it) and gain."""
        c = self.cfg
        if c.noise_prob > 0 and rng.random() < c.noise_prob:
            snr, slope = rng.uniform(*c.noise_snr_db), rng.uniform(*c.noise_slope)
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
            level = clip.pow(2).mean().sqrt() * 10 ** (-snr / 20)
            out = out + level * colored_noise(out.numel(), slope, generator)
        if c.gain_db != (0.0, 0.0):
            out = out * 10 ** (rng.uniform(*c.gain_db) / 20)
        return out

    @staticmethod
    def raw_features(batch: np.ndarray) -> np.ndarray:
        """Log-mel statistics (each bin's mean and deviation over time) of [B, 1, mels, frames]."""
        from pipeline.evaluation import baselines

        if batch.ndim == 4 and batch.shape[1] == 1:
            return baselines.logmel_stats(batch)
        return Base.raw_features(batch)

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        if self._mel is None:
            import torchaudio.transforms as AT

            c = self.cfg
            self._mel = AT.MelSpectrogram(sample_rate=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length, n_mels=c.n_mels)
        waves = [it.wave if isinstance(it, Masked) else it for it in items]
        with torch.no_grad():
            mel = self._mel(torch.stack(waves))  # [B, n_mels, frames]
        logmel = (torch.log(mel + 1e-6) - self.cfg.mean) / self.cfg.std
        for i, it in enumerate(items):
            for axis, start, width in it.masks if isinstance(it, Masked) else ():
                logmel[i].narrow(axis, start, width).zero_()
        return logmel.unsqueeze(1)  # [B, 1, n_mels, frames]

    def encoder(self, cfg: EncoderConfig | None = None) -> LogMelEncoder:
        """A ViT over the log-mel "image" [1, n_mels, frames], frames cut to whole patches."""
        cfg = cfg or EncoderConfig()
        frames = self.num_frames // cfg.patch_size * cfg.patch_size
        if frames == 0:
            raise ConfigError(f"encoder.patch_size: {cfg.patch_size} is longer than a clip's {self.num_frames} frames")
        return LogMelEncoder(cfg, (self.cfg.n_mels, frames), 1)


@dataclass(frozen=True)
class Masked:
    """A training clip and the SpecAugment masks drawn for it: (axis 0 mel / 1 frame, start, width)."""

    wave: torch.Tensor
    masks: tuple[tuple[int, int, int], ...]


def colored_noise(n: int, slope: float, generator: torch.Generator) -> torch.Tensor:
    """[n] noise of RMS 1 whose power spectrum falls as 1/f^slope (0 white, 1 pink, 2 brown), no DC."""
    spectrum = torch.fft.rfft(torch.randn(n, generator=generator))
    f = torch.arange(spectrum.numel(), dtype=torch.float32)
    spectrum = spectrum * f.clamp(min=1).pow(-slope / 2)
    spectrum[0] = 0
    x = torch.fft.irfft(spectrum, n)
    return x / x.pow(2).mean().sqrt().clamp(min=1e-12)


def _band(size: int, most: int, rng: random.Random) -> tuple[int, int]:
    """SpecAugment's mask: a width uniform in [0, most], at a uniform start that keeps it inside ``size``."""
    width = rng.randint(0, min(most, size))
    return rng.randint(0, size - width), width


class LogMelEncoder(ViTEncoder):
    """A ViT over log-mel patches. The trailing frames that do not fill a whole patch are dropped
    (1 s at hop 160 is 101 frames: patch 16 keeps 96), so every patch holds real audio; padding
    instead would add frames of a constant that is not silence after normalization."""

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return super().prepare(x[..., : self.image_size[1]])  # [B, 1, n_mels, frames] → whole patches
