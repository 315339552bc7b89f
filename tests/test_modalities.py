"""The modalities' decode and train-time transforms: PNG decoding and resizing against PIL, colour
jitter against torchvision, SpecAugment masks, text span crops; each view a function of its rng."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import png

from modalities.image import ImageConfig


def _pil_decode(data: bytes, mode: str):
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == mode else img.convert(mode)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1), ("L", 3), ("RGB", 1)])
def test_png_decoding_matches_pil(mode, channels):
    from modalities.image import Modality

    mod = Modality(ImageConfig(channels=channels))
    for i in range(20):
        data = png(i, size=5 + i, mode=mode)
        assert mod.decode(data, "png").tobytes() == _pil_decode(data, mod._mode).tobytes()


def test_unusual_and_broken_pngs_behave_as_with_pil():
    import io

    from PIL import Image

    from modalities.image import Modality

    mod = Modality(ImageConfig(channels=3))
    for img, extra in [(Image.new("P", (6, 4), 3), {}), (Image.new("L", (6, 4), 3), {"transparency": 3}),
                       (Image.new("RGB", (7, 5), (1, 2, 3)), {"interlace": 1})]:  # left to PIL's own path
        buf = io.BytesIO()
        img.save(buf, format="PNG", **extra)
        assert mod.decode(buf.getvalue(), "png").tobytes() == _pil_decode(buf.getvalue(), "RGB").tobytes()
    good = png(1)
    for broken in (good[:60], good[:29] + b"\xff" + good[30:]):  # truncated; IHDR checksum wrong
        with pytest.raises(ValueError) as ours:
            mod.decode(broken, "png")
        with pytest.raises(Exception) as pil:
            _pil_decode(broken, "RGB")
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(pil.value))
        assert str(ours.value) == f"cannot decode png: {reason}"


@pytest.mark.parametrize("channels, size", [(1, 8), (3, 8), (3, 12), (1, 30)])
def test_transform_matches_pil_resize_and_flip(channels, size):
    import random

    import numpy as np
    from PIL import Image

    from modalities.image import Modality, _center_box, _random_box

    mod = Modality(ImageConfig(size=size, channels=channels))
    for i in range(30):
        img = mod.decode(png(i, size=12), "png")
        for seed in (None, i):
            rng, ref = (random.Random(seed), random.Random(seed)) if seed is not None else (None, None)
            if ref is None:
                box = _center_box(*img.size)
            else:
                box = _random_box(*img.size, mod.cfg.crop_scale, mod.cfg.crop_ratio, ref)
            want = img.resize((size, size), Image.BILINEAR, box=box)
            if ref is not None and ref.random() < 0.5:
                want = want.transpose(Image.FLIP_LEFT_RIGHT)
            got = mod.transform(img, rng)
            assert got.shape == (size, size, channels) and got.dtype == torch.uint8
            assert torch.equal(got, torch.from_numpy(np.asarray(want).reshape(size, size, -1).copy()))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation"])
def test_jitter_matches_torchvision(channels, kind):
    """Each jitter factor is torchvision's adjust_* on the same pixels (up to the final rounding)."""
    import random

    import numpy as np
    import torchvision.transforms.functional as TF

    from modalities.image import _jitter

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (9, 7, channels), dtype=np.uint8)
    for f in (0.3, 0.9, 1.6):
        x = f - 1 if f >= 1 else 1 - f
        # a draw that yields exactly f: uniform(1 - x, 1 + x) at its end
        r = random.Random()
        r.uniform = lambda a, b, f=f: f
        got = _jitter(arr, **{k: (x if k == kind else 0.0) for k in ("brightness", "contrast", "saturation")},
                      rng=r)
        t = torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)
        if kind == "saturation" and channels == 1:
            want = t  # no saturation in a grey image
        else:
            want = getattr(TF, f"adjust_{kind}")(t, f)
        want = (want.permute(1, 2, 0).numpy() * 255)
        assert got.dtype == np.uint8 and got.shape == arr.shape
        assert np.abs(got.astype(np.float32) - want).max() <= 0.51, (kind, f)


def test_jitter_is_drawn_from_the_view_rng():
    """Views with jitter are a function of their rng; without jitter asked, the draws are unchanged."""
    import random

    from modalities.image import Modality

    img = Modality(ImageConfig(size=8)).decode(png(3, size=12), "png")
    plain = Modality(ImageConfig(size=8))
    jit = Modality(ImageConfig(size=8, brightness=0.4, contrast=0.4, saturation=0.4, jitter_p=1.0))
    a, b = jit.transform(img, random.Random(5)), jit.transform(img, random.Random(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, plain.transform(img, random.Random(5)))
    assert torch.equal(jit.transform(img, None), plain.transform(img, None))  # eval: no jitter


def test_specaugment_masks_zero_the_drawn_bands_of_the_batch_log_mel():
    """Frequency and time masks zero exactly the drawn mel bands and frame runs of the clip's
    log-mel, are a function of the clip's rng, and leave the crop's draws as they were; evaluation
    (no rng) has none."""
    import random

    from modalities.audio import AudioConfig, Masked
    from modalities.audio import Modality as Audio

    plain = Audio(AudioConfig())
    aug = Audio(AudioConfig(freq_masks=2, freq_mask_bins=12, time_masks=2, time_mask_frames=20))
    torch.manual_seed(0)
    wave = torch.randn(12000) * 0.1
    a, b = aug.transform(wave, random.Random(3)), aug.transform(wave, random.Random(3))
    assert isinstance(a, Masked) and a.masks == b.masks and len(a.masks) == 4
    assert torch.equal(a.wave, plain.transform(wave, random.Random(3)))  # the crop's draws are unchanged
    assert not isinstance(aug.transform(wave, None), Masked)
    got = aug.collate([a, plain.transform(wave, None)])
    want = plain.collate([a.wave, plain.transform(wave, None)])
    assert torch.equal(got[1], want[1])  # an unmasked clip in the same batch is untouched
    ref = want[0].clone()
    for axis, start, width in a.masks:
        idx = torch.arange(ref.shape[axis + 1])
        keep = ~((idx >= start) & (idx < start + width))
        ref = ref * (keep.view(-1, 1) if axis == 0 else keep.view(1, -1)) + 0.0
    assert torch.equal(got[0], ref) and (got[0] == 0).sum() > 0


def test_speed_perturbation_is_torchaudios_resampling_drawn_from_the_clips_rng():
    """``speed_factors`` resamples the clip by a factor drawn from the clip's rng, exactly as
    ``torchaudio.functional.speed`` does, before the shift into the window; factor 1 and evaluation
    leave the clip as it is."""
    import random

    import torchaudio.functional as AF

    from modalities.audio import AudioConfig
    from modalities.audio import Modality as Audio

    torch.manual_seed(0)
    wave = torch.randn(8000) * 0.1
    plain = Audio(AudioConfig())
    fast = Audio(AudioConfig(speed_factors=(1.1,)))
    one = Audio(AudioConfig(speed_factors=(1.0,)))
    rng = random.Random(4)
    sped = AF.speed(wave, 16000, 1.1)[0]
    assert sped.numel() < wave.numel()
    rng.choice((1.1,))  # the factor's draw comes first, then the shift's
    want = plain.transform(sped, rng)
    assert torch.equal(fast.transform(wave, random.Random(4)), want)
    rng = random.Random(4)
    rng.choice((1.0,))
    assert torch.equal(one.transform(wave, random.Random(4)), plain.transform(wave, rng))  # 1.0: no resampling
    assert torch.equal(fast.transform(wave, None), plain.transform(wave, None))
    both = Audio(AudioConfig(speed_factors=(0.9, 1.1)))
    views = {both.transform(wave, random.Random(s)).count_nonzero().item() for s in range(20)}
    assert len(views) > 1  # both factors drawn: 0.9 gives the longer clip


def test_room_noise_fills_the_window_at_the_drawn_snr_and_spectral_slope():
    """Background noise covers the whole window, the zero padding included, at the signal-to-noise
    ratio asked against the clip's own RMS; it comes from the clip's rng after the shift's draw (the
    clean part is the plain transform's), a slope of 2 puts its power at low frequencies where 0 spreads
    it flat, the gain scales the window, and evaluation gets none of it."""
    import random

    from modalities.audio import AudioConfig, colored_noise
    from modalities.audio import Modality as Audio

    torch.manual_seed(0)
    wave = torch.randn(6000) * 0.1
    plain = Audio(AudioConfig())
    noisy = Audio(AudioConfig(noise_prob=1.0, noise_snr_db=(20.0, 20.0), noise_slope=(0.0, 0.0)))
    clean = plain.transform(wave, random.Random(7))
    got = noisy.transform(wave, random.Random(7))
    assert torch.equal(got, noisy.transform(wave, random.Random(7)))
    noise = got - clean
    assert (noise != 0).all()  # the padding too: a recording has no digital silence
    snr = 20 * torch.log10(wave.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt())
    assert abs(snr.item() - 20.0) < 1e-3
    assert not torch.equal(got, noisy.transform(wave, random.Random(8)))
    assert torch.equal(noisy.transform(wave, None), plain.transform(wave, None))
    never = Audio(AudioConfig(noise_prob=0.0))
    assert torch.equal(never.transform(wave, random.Random(7)), clean)

    def low_share(slope: float) -> float:
        power = torch.fft.rfft(colored_noise(16000, slope, torch.Generator().manual_seed(0))).abs().pow(2)
        return (power[: len(power) // 10].sum() / power.sum()).item()

    assert 0.05 < low_share(0.0) < 0.15 and low_share(2.0) > 0.9
    loud = Audio(AudioConfig(gain_db=(6.0, 6.0)))
    assert torch.allclose(loud.transform(wave, random.Random(7)), clean * 10 ** (6 / 20))
    with pytest.raises(ValueError, match=r"noise_snr_db\n.*low <= high"):
        AudioConfig(noise_snr_db=(30.0, 10.0))


def test_text_span_crop_keeps_a_contiguous_span_of_the_tokens(starter_tokenizer):
    """``crop_min`` keeps a contiguous run of at least that share of the tokens, between the special
    tokens, drawn from the view's rng; evaluation and ``crop_min: 1`` keep every token."""
    import random

    from modalities.text import Modality as Text
    from modalities.text import TextConfig

    text = "the quick brown fox jumps over the lazy dog near the river bank at dawn"
    plain = Text(TextConfig(tokenizer=starter_tokenizer, max_length=64))
    crop = Text(TextConfig(tokenizer=starter_tokenizer, max_length=64, crop_min=0.5))
    full = plain.transform(text, random.Random(0)).tolist()
    assert crop.transform(text, None).tolist() == full
    inner, lengths = full[1:-1], set()
    for seed in range(40):
        got = crop.transform(text, random.Random(seed)).tolist()
        assert got == crop.transform(text, random.Random(seed)).tolist()
        assert got[0] == full[0] and got[-1] == full[-1]
        span = got[1:-1]
        assert len(span) >= round(0.5 * len(inner)) - 1
        assert any(inner[i : i + len(span)] == span for i in range(len(inner) - len(span) + 1))
        lengths.add(len(span))
    assert len(lengths) > 3


def test_raw_features_are_each_modalitys_own_baseline():
    """``embed(space="raw")`` asks the modality: images their flattened pixels, audio the log-mel
    statistics of ``pipeline.evaluation.baselines``."""
    import numpy as np

    from pipeline import registry
    from pipeline.evaluation import baselines

    rng = np.random.default_rng(0)
    mels, images = rng.random((3, 1, 64, 101), np.float32), rng.random((3, 3, 32, 32), np.float32)
    assert np.array_equal(registry.modality("audio").raw_features(mels), baselines.logmel_stats(mels))
    assert registry.modality("audio").raw_features(mels).shape == (3, 128)
    assert np.array_equal(registry.modality("image").raw_features(images), baselines.pixel_features(images))
