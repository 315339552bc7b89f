"""Train a subword tokenizer on the ``txt`` of a shard set and save it where
``transformers.AutoTokenizer.from_pretrained(DIR)`` (and so ``modalities.text``) loads it.

    selfsup tokenize SHARDS --out DIR [--kind wordpiece|bpe] [--vocab-size 8000] [--lowercase true]

``wordpiece`` is BERT's layout ([CLS] text [SEP], [MASK], [PAD]); ``bpe`` is byte-level BPE as in
RoBERTa (<s> text </s>, <mask>, <pad>), which never meets an unknown character. Text streams
from the shards into the trainer; nothing is held in memory beyond the tokenizer's counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from pipeline.config import ConfigError
from pipeline.data.shards import iter_samples, open_shards
from pipeline.stage import Context, StageConfig
from stages.validate import shard_inputs

MODEL_MAX_LENGTH = 512  # the longest input models here are built for; text.max_length stays below it


class Config(StageConfig):
    shards: list[str] = Field(description="shard directories (with manifest.json), manifests, brace patterns or globs")
    kind: Literal["wordpiece", "bpe"] = Field(default="wordpiece", description="wordpiece (BERT) or bpe (byte-level)")
    vocab_size: int = Field(default=8000, description="vocabulary size, special tokens included")
    min_frequency: int = Field(default=2, description="pairs seen fewer times are not merged")
    lowercase: bool = Field(default=True, description="lowercase text before splitting it")
    max_samples: int | None = Field(default=None, description="train on at most this many texts")


positional = ("shards",)

#: per kind: special tokens (in id order) and the names transformers gives them
SPECIALS = {
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "bpe": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
            "mask_token": "<mask>"},
}


def inputs(cfg: Config, ctx: Context) -> list[str]:
    return shard_inputs(cfg.shards, ctx)


def run(cfg: Config, ctx: Context) -> dict:
    from transformers import PreTrainedTokenizerFast

    t0 = time.time()
    shards = open_shards([str(ctx.path(s)) for s in cfg.shards])
    total = min(shards.total, cfg.max_samples or shards.total)
    stats = {"texts": 0, "skipped": []}
    tok = build(cfg.kind, cfg.lowercase)
    trainer = _trainer(cfg)
    tok.train_from_iterator(texts(shards, cfg.max_samples, stats, ctx.progress, total), trainer, length=total)
    if stats["texts"] == 0:
        raise ConfigError(f"tokenize: no sample of {' '.join(cfg.shards)} has a 'txt' key to train on")
    if cfg.kind == "wordpiece":
        tok = canonical_wordpiece(tok)
    _finish(tok, cfg.kind)
    specials = dict(SPECIALS[cfg.kind])
    if cfg.kind == "bpe":  # RoBERTa names; modalities.text looks for cls/sep first, bos/eos otherwise
        specials.update(cls_token="<s>", sep_token="</s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MODEL_MAX_LENGTH, **specials)
    fast.save_pretrained(str(ctx.out_dir))
    for line in stats["skipped"][:5]:
        ctx.log.warning("skipped %s", line)
    summary = {"kind": cfg.kind, "vocab_size": tok.get_vocab_size(), "samples": stats["texts"],
               "skipped": len(stats["skipped"]), "seconds": round(time.time() - t0, 2), "dir": str(ctx.out_dir)}
    ctx.log.info("%s tokenizer, %d tokens, trained on %d texts in %.1fs → %s", cfg.kind,
                 summary["vocab_size"], summary["samples"], summary["seconds"], ctx.out_dir)
    return summary


def texts(shards, limit: int | None, stats: dict, progress: bool, total: int) -> Iterator[str]:
    """The ``txt`` of every sample, in shard order; text that is not UTF-8 is skipped and noted."""
    from tqdm import tqdm

    with tqdm(total=total, desc="tokenize", unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for shard in shards.shards:
            for sample in iter_samples(shard.path):
                data = sample.get("txt")
                if data is None:
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    key = sample["__key__"]
                    stats["skipped"].append(f"{shard.path}: sample {key!r}: txt is not UTF-8 ({e.reason})")
                    continue
                stats["texts"] += 1
                bar.update()
                yield text
                if limit is not None and stats["texts"] >= limit:
                    return


def build(kind: str, lowercase: bool):
    """An untrained ``tokenizers.Tokenizer`` with the normalizer and pre-tokenizer of ``kind``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok
    tok = Tokenizer(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _trainer(cfg: Config):
    from tokenizers import pre_tokenizers, trainers

    specials = list(SPECIALS[cfg.kind].values())
    if cfg.kind == "wordpiece":
        return trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                         special_tokens=specials, show_progress=False)
    return trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=specials,
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)


def canonical_wordpiece(tok):
    """The trained WordPiece tokenizer with its ids in a fixed order: the special tokens first, as
    trained, then every other token sorted by its string.

    The trainer numbers its alphabet (and the pieces built on it) in the order of a hash map seeded
    anew in every training, so two runs over the same texts learn the same pieces under different
    ids: on the starter's texts, 252 of 8,000 ids moved between two runs, and with them the rows of
    a random-init embedding. WordPiece encodes by the longest match in the vocabulary alone, so
    renumbering changes no tokenization, only the ids. (Where pair counts tie, the trainer's choice
    between the tied merges can follow that order too, and on small corpora the pieces themselves
    can then differ; the starter's do not.)
    """
    from tokenizers import models

    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    vocab = tok.get_vocab(with_added_tokens=False)
    head = sorted((t for t in vocab if t in specials), key=vocab.__getitem__)
    order = head + sorted(t for t in vocab if t not in specials)
    trained = tok.model
    tok.model = models.WordPiece({t: i for i, t in enumerate(order)}, unk_token=trained.unk_token,
                                 continuing_subword_prefix=trained.continuing_subword_prefix,
                                 max_input_chars_per_word=trained.max_input_chars_per_word)
    return tok


def _finish(tok, kind: str) -> None:
    """Add the special tokens around every encoded text, as the model expects to see them."""
    from tokenizers import processors

    first, last = ("[CLS]", "[SEP]") if kind == "wordpiece" else ("<s>", "</s>")
    ids = [(first, tok.token_to_id(first)), (last, tok.token_to_id(last))]
    template = processors.TemplateProcessing(single=f"{first} $A {last}", pair=f"{first} $A {last} $B:1 {last}:1",
                                             special_tokens=ids)
    tok.post_processor = template if kind == "wordpiece" else \
        processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
