"""Build the small starter data sets under ``data/starter/`` as webdataset shards.

Every split directory holds gzip-compressed tar shards and a ``manifest.json`` written by
``pipeline.data.writer.write_shards``, so they are exactly what the pipeline reads. Sources, all local:

* ``fmnist``  Fashion-MNIST IDX files of the Debian package ``dataset-fashion-mnist``
  (``png`` 28x28 grayscale, ``cls``, ``json``).
* ``emoji``   Google (Noto) emoji images and names from the npm package
  ``emoji-datasource-google`` (``png`` RGB, ``txt`` caption, ``cls`` category, ``json``).
* ``emoji_twitter`` the same emoji drawn by Twemoji, from ``emoji-datasource-twitter``: a second
  art style, split by the same hash, so a test emoji is in neither train split.
* ``wordnet`` WordNet 3.0 synset glosses from ``wordnet-base`` (``txt``, ``cls`` lexicographer
  file, ``json``).
* ``kjv``     King James Bible verses printed by ``bible`` of ``bible-kjv`` (``txt``, ``json``).
* ``speech``  short English words spoken by ``espeak-ng`` in many voices, speeds and pitches,
  16 kHz mono (``flac``, ``txt``, ``cls``, ``json``); three voices appear only in ``test``.
* ``speech_flite`` the same words spoken by a second engine, ``flite``, in voices built from
  recordings of real speakers; one speaker is heard only in ``test``.

Run ``bash scripts/build_starter_data.sh`` to install the packages and rebuild everything;
``SOURCES.md`` in the output directory is rewritten with the counts of the build. ``--only speech``
(repeatable) rebuilds some sets and rewrites only their sections of ``SOURCES.md``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline import registry
from pipeline.data.shards import iter_samples, open_shards
from pipeline.data.writer import write_shards

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_DIR = Path("/usr/share/wordnet")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

#: lexicographer file names by number, as in lexnames(5WN)
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
WORDNET_POS = ["noun", "verb", "adj", "adv"]

SPEECH_WORDS = sorted([
    "top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "cat", "dog", "bird", "tree", "house", "water", "fire", "red", "green", "blue",
    "happy", "bed", "sun", "moon", "book", "fish", "hand", "car", "apple", "wow",
])
TRAIN_VOICES = ["en-us", "en-us+m3", "en-us+f2", "en-us+klatt", "en-gb", "en-gb+m2", "en-gb+f3",
                "en-gb+m7", "en-gb-x-rp+m4", "en-gb-x-rp+f1", "en-gb-x-gbclan+m1", "en-gb-x-gbcwmd+f5"]
#: accents and variants that never occur in the training voices
TEST_VOICES = ["en-gb-scotland+m5", "en-029+f4", "en-us-nyc+klatt3"]
#: more speakers of the training accents: the draw over TRAIN_VOICES above is kept as it was, so the
#: test split does not move; variants m2 m7 f5 (the validation voices of a ``holdout_by: voice``
#: source) and m5 f4 klatt3 (the test voices) stay out
EXTRA_TRAIN_VOICES = [f"{dialect}+{variant}" for dialect in ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan",
                                                             "en-gb-x-gbcwmd")
                      for variant in ("m1", "m3", "m4", "m6", "m8", "f1", "f2", "f3",
                                      "klatt", "klatt2", "klatt4", "klatt5", "klatt6")
                      if f"{dialect}+{variant}" not in TRAIN_VOICES]
SPEEDS = [130, 160, 190]
PITCHES = [35, 50, 65]
SPEECH_TRAIN_PER_WORD = 30
SPEECH_TEST_PER_WORD = 8
SPEECH_EXTRA_PER_WORD = 30
#: a second engine (Debian ``flite``), whose voices are built from recordings of real speakers: CMU
#: ARCTIC's rms and slt, and kal's diphones at 16 and 8 kHz; awb, another speaker, is test-only
FLITE_TRAIN_VOICES = ["rms", "slt", "kal16", "kal"]
FLITE_TEST_VOICES = ["awb"]
#: flite's ``duration_stretch`` (0.8 speaks faster, 1.25 slower); every voice speaks every word at each
FLITE_STRETCHES = [0.8, 0.9, 1.0, 1.1, 1.25]
SAMPLE_RATE = 16000
#: the sets, in the order they are built and told in SOURCES.md
STEPS = ("fmnist", "emoji", "emoji_twitter", "wordnet", "kjv", "speech", "speech_flite")


class EmojiArt(NamedTuple):
    vendor: str  #: the package's image folder and ``has_img_<vendor>`` flag
    key_prefix: str
    licence: str


#: one set per art style of the same emoji (the npm package ``emoji-datasource-<vendor>``)
EMOJI_ART = {
    "emoji": EmojiArt("google", "emoji", "images are Google Noto Emoji, Apache-2.0 (per the package README)"),
    "emoji_twitter": EmojiArt("twitter", "twemoji", "images are Twemoji, Copyright 2019 Twitter, Inc and other "
                              "contributors, CC-BY 4.0 (per the package README)"),
}


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_test(key: str, fraction: float) -> bool:
    return stable_hash(key) % 10_000 < fraction * 10_000


def mixed(items: list[dict]) -> list[dict]:
    """Items in a fixed pseudo-random order, so every shard holds a mix of classes."""
    return sorted(items, key=lambda it: stable_hash(it["__key__"]))


def as_bytes(sample: dict) -> dict:
    """Encode the ``str`` / ``int`` / ``dict`` fields of a sample as the bytes a shard stores."""
    out = {"__key__": sample["__key__"]}
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if isinstance(value, (int, str)):
            value = str(value).encode("utf-8")
        out[ext] = value
    return out


def write_split(out: Path, split: str, items, to_sample, per_shard: int) -> dict:
    return write_shards(items, to_sample, out / split, prefix=split, max_count=per_shard,
                        compress=True, workers=2, progress=True)


def write_splits(out: Path, splits: dict[str, list[dict]], to_sample=as_bytes, min_shards: int = 8) -> dict:
    """Write each split with the same shard size, chosen so ``train`` has ``min_shards`` shards."""
    per_shard = math.ceil(len(splits["train"]) / min_shards)
    return {name: write_split(out, name, items, to_sample, per_shard) for name, items in splits.items()}


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: zero, type code, rank, dimensions) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type {data[2]:#x}, expected unsigned bytes")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """The first ``limit // classes`` indices of every class, in their original order."""
    classes = np.unique(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    per_class = limit // len(classes)
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    return np.sort(keep)


def build_fmnist(out: Path, train_limit: int) -> dict:
    enc = registry.modality("image")(registry.modality("image").Config(channels=1))
    manifests = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images = read_idx(FMNIST_DIR / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FMNIST_DIR / f"{stem}-labels-idx1-ubyte.gz")
        keep = balanced_subset(labels, train_limit) if split == "train" else np.arange(len(labels))

        def to_sample(i, images=images, labels=labels, split=split):
            label = int(labels[i])
            ext, png = enc.encode(images[i])
            return as_bytes({"__key__": f"fmnist_{split}_{i:05d}", ext: png, "cls": label,
                             "json": {"label": FMNIST_CLASSES[label]}})

        manifests[split] = write_split(out, split, keep.tolist(), to_sample, per_shard=5000)
    return manifests


# ---------------------------------------------------------------------------------------------
# Emoji


def read_emoji_package(tarball: Path, vendor: str) -> tuple[list[dict], dict[str, bytes], dict]:
    """``emoji.json``, the 64 px images of ``vendor`` by file name, and ``package.json`` of the tarball."""
    images: dict[str, bytes] = {}
    meta: dict[str, bytes] = {}
    prefix = f"package/img/{vendor}/64/"
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(prefix):
                images[member.name[len(prefix):]] = tar.extractfile(member).read()
            elif member.name in ("package/emoji.json", "package/package.json"):
                meta[member.name] = tar.extractfile(member).read()
    return json.loads(meta["package/emoji.json"]), images, json.loads(meta["package/package.json"])


def emoji_image(png: bytes, size: int) -> Image.Image:
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB").resize((size, size), Image.LANCZOS)


def emoji_caption(entry: dict) -> str:
    if entry.get("name"):
        return entry["name"].lower()
    return entry["short_name"].replace("_", " ")


def build_emoji(out: Path, tarball: Path, size: int, art: EmojiArt) -> tuple[dict, list[str], str]:
    entries, images, package = read_emoji_package(tarball, art.vendor)
    entries = [e for e in entries if e.get(f"has_img_{art.vendor}") and e["image"] in images
               and e["category"] != "Component"]
    categories = sorted({e["category"] for e in entries})
    enc = registry.modality("image")()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for e in entries:
        split = "test" if is_test(e["unified"], 0.15) else "train"
        splits[split].append({"__key__": f"{art.key_prefix}_{e['unified'].lower()}", "entry": e})

    def to_sample(item):
        e = item["entry"]
        ext, png = enc.encode(emoji_image(images[e["image"]], size))
        info = {k: e.get(k) for k in ("name", "short_name", "category", "subcategory", "unified")}
        return as_bytes({"__key__": item["__key__"], ext: png, "txt": emoji_caption(e),
                         "cls": categories.index(e["category"]), "json": info})

    manifests = write_splits(out, {k: mixed(v) for k, v in splits.items()}, to_sample)
    return manifests, categories, package["version"]


# ---------------------------------------------------------------------------------------------
# WordNet


def parse_synset(line: str, pos: str) -> dict:
    """One line of ``data.<pos>``: offset, lex_filenum, ss_type, w_cnt (hex), word/lex_id pairs,
    pointers and, after `` | ``, the gloss."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, count = fields[0], int(fields[1]), int(fields[3], 16)
    words = [w.split("(")[0].replace("_", " ") for w in fields[4: 4 + 2 * count: 2]]
    return {"__key__": f"wn_{pos}_{offset}", "txt": f"{', '.join(words)}: {gloss.strip()}",
            "cls": lex_filenum, "json": {"lexname": LEXNAMES[lex_filenum], "pos": pos}}


def read_synsets() -> list[dict]:
    synsets = []
    for pos in WORDNET_POS:
        with open(WORDNET_DIR / f"data.{pos}", encoding="utf-8") as f:
            synsets += [parse_synset(line, pos) for line in f if line.strip() and not line.startswith("  ")]
    return synsets


def build_wordnet(out: Path, per_class: int) -> dict:
    """At most ``per_class`` synsets of every lexicographer file (a fixed hash-ordered pick)."""
    by_class: dict[int, list[dict]] = {}
    for synset in read_synsets():
        by_class.setdefault(synset["cls"], []).append(synset)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for synsets in by_class.values():
        for synset in sorted(synsets, key=lambda s: stable_hash("pick " + s["__key__"]))[:per_class]:
            splits["test" if is_test(synset["__key__"], 0.10) else "train"].append(synset)
    return write_splits(out, {k: mixed(v) for k, v in splits.items()})


# ---------------------------------------------------------------------------------------------
# King James Bible


def build_kjv(out: Path) -> dict:
    """One sample per verse; every 50th verse goes to ``test``."""
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                          text=True).stdout
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i, line in enumerate(v for v in text.splitlines() if v.strip()):
        ref, _, verse = line.partition(" ")
        sample = {"__key__": f"kjv_{i:05d}", "txt": verse.strip(), "json": {"ref": ref}}
        splits["test" if i % 50 == 49 else "train"].append(sample)
    return write_splits(out, splits)


# ---------------------------------------------------------------------------------------------
# Speech


class Utterance(NamedTuple):
    """One word to synthesize: ``argv`` runs the engine, writing the file named ``{wav}``."""

    word: str
    split: str
    key: str
    meta: dict
    argv: list[str]


def espeak_utterances() -> list[Utterance]:
    """A fixed random draw of espeak-ng's voice/speed/pitch grid per word."""
    draws = []
    for word in SPEECH_WORDS:
        rng = random.Random(stable_hash(word))
        for split, voices, n in (("train", TRAIN_VOICES, SPEECH_TRAIN_PER_WORD),
                                 ("test", TEST_VOICES, SPEECH_TEST_PER_WORD)):
            grid = [(v, s, p) for v in voices for s in SPEEDS for p in PITCHES]
            draws += [(word, v, s, p, split) for v, s, p in rng.sample(grid, n)]
        grid = [(v, s, p) for v in EXTRA_TRAIN_VOICES for s in SPEEDS for p in PITCHES]
        extra = random.Random(stable_hash(word + "/extra")).sample(grid, SPEECH_EXTRA_PER_WORD)
        draws += [(word, v, s, p, "train") for v, s, p in extra]
    return [Utterance(word, split, f"speech_{word}_{voice}_{speed}_{pitch}".replace("+", "_"),
                      {"word": word, "voice": voice, "speed": speed, "pitch": pitch},
                      ["espeak-ng", "-w", "{wav}", "-v", voice, "-s", str(speed), "-p", str(pitch), word])
            for word, voice, speed, pitch, split in draws]


def flite_utterances() -> list[Utterance]:
    """Every word in every flite voice at every stretch."""
    return [Utterance(word, split, f"flite_{word}_{voice}_{round(stretch * 100)}",
                      {"word": word, "voice": f"flite-{voice}", "stretch": stretch},
                      ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}", "-t", word, "-o", "{wav}"])
            for word in SPEECH_WORDS
            for split, voices in (("train", FLITE_TRAIN_VOICES), ("test", FLITE_TEST_VOICES))
            for voice in voices for stretch in FLITE_STRETCHES]


def trim_silence(wave: np.ndarray, sr: int, below_peak_db: float = 40.0, pad_s: float = 0.02) -> np.ndarray:
    threshold = np.abs(wave).max() * 10 ** (-below_peak_db / 20)
    loud = np.flatnonzero(np.abs(wave) > threshold)
    if loud.size == 0:
        return wave
    pad = int(pad_s * sr)
    return wave[max(0, loud[0] - pad): loud[-1] + pad + 1]


def render(utterance: Utterance, tmp: Path) -> np.ndarray:
    """Speak one word; mono float32 at ``SAMPLE_RATE``, silence trimmed."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    wav = tmp / f"{utterance.key}.wav"
    subprocess.run([str(wav) if a == "{wav}" else a for a in utterance.argv], check=True, capture_output=True)
    wave, sr = sf.read(wav, dtype="float32", always_2d=True)
    wav.unlink()
    wave = trim_silence(wave.mean(axis=1), sr)
    return AF.resample(torch.from_numpy(wave), sr, SAMPLE_RATE).numpy()


def build_speech(out: Path, utterances: list[Utterance], jobs_n: int) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs_n) as pool:
        waves = list(pool.map(lambda u: render(u, Path(tmp)), utterances))
    enc = registry.modality("audio")()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for u, wave in zip(utterances, waves):
        ext, flac = enc.encode((wave, SAMPLE_RATE))
        splits[u.split].append({"__key__": u.key, ext: flac, "txt": u.word, "cls": SPEECH_WORDS.index(u.word),
                                "json": u.meta})
    return write_splits(out, {k: mixed(v) for k, v in splits.items()})


# ---------------------------------------------------------------------------------------------
# SOURCES.md, verification, entry point


def deb_version(package: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], check=False, capture_output=True,
                          text=True).stdout.strip() or "unknown"  # not installed: no version


def split_lines(manifests: dict) -> list[str]:
    return [f"- `{split}/`: {m['total']} samples in {len(m['shards'])} shards" for split, m in manifests.items()]


def numbered(names: list[str]) -> str:
    return ", ".join(f"{i} {name}" for i, name in enumerate(names))


def fmnist_section(manifests: dict) -> list[str]:
    per_class = manifests["train"]["total"] // len(FMNIST_CLASSES)
    return ["## fmnist",
            (f"Fashion-MNIST, Debian package `dataset-fashion-mnist` {deb_version('dataset-fashion-mnist')}. "
             f"Train holds the first {per_class} images of each class of the 60000; test is complete."),
            "Licence: MIT (Expat), Copyright 2017 Zalando SE; full text in `fmnist/COPYRIGHT`.",
            *split_lines(manifests),
            "Keys: `png` (28x28 grayscale), `cls`, `json` {label}.",
            f"Labels: {numbered(FMNIST_CLASSES)}."]


def emoji_section(name: str, built: tuple[dict, list[str], str]) -> list[str]:
    manifests, categories, version = built
    art = EMOJI_ART[name]
    return [f"## {name}",
            (f"npm package `emoji-datasource-{art.vendor}` {version}, `img/{art.vendor}/64` and `emoji.json`; "
             "composited on white, resized with Lanczos. Category `Component` is left out; test is ~15 % by hash "
             "of `unified` (the same emoji in every art set)."),
            f"Licence: {art.licence}; the emoji.json data is MIT (`{name}/LICENSE`).",
            *split_lines(manifests),
            ("Keys: `png` (RGB), `txt` (lower-cased name), `cls` (category), "
             "`json` {name, short_name, category, subcategory, unified}."),
            f"Labels: {numbered(categories)}."]


def wordnet_section(manifests: dict, per_class: int) -> list[str]:
    return ["## wordnet",
            (f"WordNet 3.0 glosses, Debian package `wordnet-base` {deb_version('wordnet-base')}, "
             f"`data.{{noun,verb,adj,adv}}`; at most {per_class} synsets per lexicographer file "
             "(a fixed pick by hash), test is ~10 % of those by hash of the synset."),
            ("Licence: WordNet 3.0 licence (permissive). WordNet 3.0 Copyright 2006 by Princeton University. "
             "All rights reserved. Full licence text and disclaimer in `wordnet/COPYRIGHT`."),
            *split_lines(manifests),
            "Keys: `txt` (\"word1, word2: gloss\"), `cls` (lexicographer file number), `json` {lexname, pos}.",
            f"Labels: {numbered(LEXNAMES)}."]


def kjv_section(manifests: dict) -> list[str]:
    return ["## kjv",
            (f"King James Version, Debian package `bible-kjv` {deb_version('bible-kjv')}, one sample per verse "
             "of `bible -f Gen1:1-Rev22:21`; every 50th verse is in `test/`."),
            "Licence: the text is in the public domain.",
            *split_lines(manifests),
            "Keys: `txt` (verse), `json` {ref} (reference as `bible` prints it, e.g. `Ge1:1`)."]


def speech_section(manifests: dict) -> list[str]:
    return ["## speech",
            (f"Single English words rendered with `espeak-ng` {deb_version('espeak-ng')}, trimmed, 16 kHz mono. "
             f"Train voices: {', '.join(TRAIN_VOICES)}; {SPEECH_TRAIN_PER_WORD} renders per word drawn from "
             f"them, and {SPEECH_EXTRA_PER_WORD} more from {', '.join(EXTRA_TRAIN_VOICES)}. "
             f"Test-only voices: {', '.join(TEST_VOICES)}, {SPEECH_TEST_PER_WORD} renders per word. "
             f"Speeds {SPEEDS}, pitches {PITCHES}."),
            "Licence: espeak-ng is GPL-3.0-or-later; the clips are its synthesized output of common words.",
            *split_lines(manifests),
            "Keys: `flac`, `txt` (the word), `cls`, `json` {word, voice, speed, pitch}.",
            f"Labels: {numbered(SPEECH_WORDS)}."]


def speech_flite_section(manifests: dict) -> list[str]:
    return ["## speech_flite",
            (f"The words of `speech` rendered with `flite` {deb_version('flite')}, whose voices are built from "
             f"recordings of real speakers, trimmed, 16 kHz mono. Train voices: {', '.join(FLITE_TRAIN_VOICES)}; "
             f"test-only voice: {', '.join(FLITE_TEST_VOICES)}; every word in every voice at each duration "
             f"stretch of {FLITE_STRETCHES}."),
            ("Licence: flite and its voices are free software under CMU's permissive licence; full text in "
             "`speech_flite/COPYRIGHT`. The clips are its synthesized output of common words."),
            *split_lines(manifests),
            "Keys: `flac`, `txt` (the word), `cls`, `json` {word, voice, stretch}.",
            f"Labels: as `speech`: {numbered(SPEECH_WORDS)}."]


def write_sources(out: Path, sections: dict[str, list[str]]) -> None:
    """Write SOURCES.md; sets not rebuilt keep the section an earlier build wrote."""
    head = ["# Starter data", "",
            "Webdataset shards (`.tar.gz`) with a `manifest.json` per split directory.",
            "Rebuild: `bash scripts/build_starter_data.sh`"]
    path = out / "SOURCES.md"
    kept = {}
    if path.exists():
        for block in path.read_text().split("\n\n## ")[1:]:
            kept[block.split("\n", 1)[0]] = "## " + block.strip()
    text = {name: kept.get(name) for name in STEPS}
    text.update({name: "\n".join(section) for name, section in sections.items()})
    missing = [name for name, block in text.items() if block is None]
    if missing:
        raise RuntimeError(f"{path}: no section for {', '.join(missing)}; rebuild them (drop --only)")
    path.write_text("\n\n".join(["\n".join(head), *text.values()]) + "\n")


def copy_notices(out: Path, names: list[str], tarballs: dict[str, Path]) -> None:
    """Licence texts that must travel with copies of the data."""
    for name, package in (("fmnist", "dataset-fashion-mnist"), ("wordnet", "wordnet-base"),
                          ("speech_flite", "libflite1")):
        if name in names:
            shutil.copyfile(f"/usr/share/doc/{package}/copyright", out / name / "COPYRIGHT")
    for name in EMOJI_ART:
        if name in names:
            with tarfile.open(tarballs[name], "r:gz") as tar:
                (out / name / "LICENSE").write_bytes(tar.extractfile("package/LICENSE").read())


def verify(out: Path, samples: int = 3) -> None:
    """Check manifest totals against the shards and decode the first samples of every split."""
    decoders = {"png": registry.modality("image")(), "flac": registry.modality("audio")(),
                "txt": registry.modality("text")()}
    for manifest in sorted(out.glob("*/*/manifest.json")):
        split = manifest.parent
        total = json.loads(manifest.read_text())["total"]
        shards = open_shards(split)
        counted = sum(len(list(iter_samples(s.path))) for s in shards.shards)
        if not total == shards.total == counted:
            raise RuntimeError(f"{split}: manifest {total}, shards {shards.total}, counted {counted}")
        for sample in iter_samples(shards.shards[0].path, 0, samples):
            for ext, modality in decoders.items():
                if ext in sample:
                    modality.decode(sample[ext], ext)
        print(f"ok {split.relative_to(out)}: {total} samples, {len(shards)} shards")


def tarball_flag(name: str) -> str:
    """The option naming the npm tarball of emoji set ``name`` (``--emoji-twitter-tarball``)."""
    return f"--{name.replace('_', '-')}-tarball"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, art in EMOJI_ART.items():
        ap.add_argument(tarball_flag(name), type=Path, help=f"emoji-datasource-{art.vendor}-*.tgz made by npm pack")
    ap.add_argument("--out", type=Path, default=Path("data/starter"))
    ap.add_argument("--only", action="append", choices=STEPS, help="rebuild only this set (repeatable)")
    ap.add_argument("--fmnist-train", type=int, default=30000, help="class-balanced cap on Fashion-MNIST train")
    ap.add_argument("--wordnet-per-class", type=int, default=2000, help="cap on synsets per lexicographer file")
    ap.add_argument("--emoji-size", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng / flite renders")
    args = ap.parse_args()
    names = args.only or list(STEPS)
    tarballs = {name: getattr(args, f"{name}_tarball") for name in EMOJI_ART}
    for name in EMOJI_ART:
        if name in names and tarballs[name] is None:
            ap.error(f"{tarball_flag(name)} is needed to build {name} (or pass --only for the other sets)")

    # each set: what builds it (into its folder) and its SOURCES.md section (of what the build returns)
    steps = {"fmnist": (lambda o: build_fmnist(o, args.fmnist_train), fmnist_section),
             **{name: (lambda o, name=name: build_emoji(o, tarballs[name], args.emoji_size, EMOJI_ART[name]),
                       lambda built, name=name: emoji_section(name, built)) for name in EMOJI_ART},
             "wordnet": (lambda o: build_wordnet(o, args.wordnet_per_class),
                         lambda m: wordnet_section(m, args.wordnet_per_class)),
             "kjv": (build_kjv, kjv_section),
             "speech": (lambda o: build_speech(o, espeak_utterances(), args.jobs), speech_section),
             "speech_flite": (lambda o: build_speech(o, flite_utterances(), args.jobs), speech_flite_section)}
    written = {}
    for name in names:
        if (args.out / name).exists():
            shutil.rmtree(args.out / name)
        start = time.perf_counter()
        build, section = steps[name]
        written[name] = section(build(args.out / name))
        print(f"{name}: {time.perf_counter() - start:.1f} s")
    write_sources(args.out, written)
    copy_notices(args.out, names, tarballs)
    verify(args.out)


if __name__ == "__main__":
    main()
