"""Objectives over every registered (objective × modality) on real starter batches: finite loss,
gradients to every trainable parameter, loss going down; and parity with the field's parts:
MLM masking statistics against transformers' collator, the CLIP loss against open_clip's, and
k accumulated micro-batches against one big batch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import STARTER

from modalities.audio import AudioConfig
from modalities.image import ImageConfig
from modalities.text import TextConfig
from pipeline import registry
from pipeline.config import ConfigError
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader
from pipeline.encoders.base import EncoderConfig
from pipeline.train.learner import Learner
from pipeline.train.loop import param_groups

ENCODER = EncoderConfig(hidden_size=64, num_layers=2, num_heads=2, patch_size=4)
#: every registered objective, with the modalities it trains (a new objective must be added here)
CASES = {
    "mlm": [("text",)],
    "mae": [("image",), ("audio",)],
    "data2vec": [("image",), ("text",), ("audio",)],
    "clip": [("image", "text"), ("audio", "text")],
    "classify": [("image",), ("text",), ("audio",)],
    "joint": [("image",), ("text",), ("audio",)],
}
#: objectives comparing augmented views of each sample (their batches come with two)
VIEWED = {"joint"}
#: the starter source holding each combination of modalities
SOURCE = {("image",): "fmnist", ("text",): "wordnet", ("audio",): "speech", ("image", "text"): "emoji",
          ("audio", "text"): "speech"}


def modality_cfgs(tokenizer: str) -> dict:
    return {"image": ImageConfig(size=16, channels=3), "text": TextConfig(tokenizer=tokenizer, max_length=32),
            "audio": AudioConfig(n_mels=32, clip_seconds=0.5)}


def starter_batch(modalities: tuple[str, ...], tokenizer: str, n: int = 16, views: int = 1) -> dict:
    """The first ``n`` samples of a starter test split holding ``modalities``, collated; with
    ``views`` > 1 augmented, with that many views of each."""
    name = SOURCE[modalities]
    src = SourceConfig(shards=str(STARTER / name / "test"), modalities=list(modalities), label="cls")
    cfg = LoaderConfig(batch_size=n, num_workers=0, augment=views > 1, views=views)
    return next(iter(StreamingLoader({name: src}, cfg, modality_cfgs(tokenizer), seed=0)))


def batch_for(objective: str, modalities: tuple[str, ...], tokenizer: str, step: int = 0) -> dict:
    return {**starter_batch(modalities, tokenizer, views=2 if objective in VIEWED else 1), "__step__": step}


def settings(objective: str, modalities: tuple[str, ...]) -> dict:
    if objective == "clip":
        return {"modalities": list(modalities)}
    if objective == "classify":  # every starter label id is below 1000
        return {"modality": modalities[0], "classes": list(range(1000))}
    if objective == "joint":  # masking too: a short text's two windows are the same
        return {"modality": modalities[0], "mask_ratio": 0.15}
    return {"modality": modalities[0]}


def learner(objective: str, modalities: tuple[str, ...], tokenizer: str, seed: int = 0, **extra) -> Learner:
    torch.manual_seed(seed)
    cfgs = modality_cfgs(tokenizer)
    encoders = {m: registry.modality(m)(cfgs[m]).encoder(ENCODER) for m in modalities}
    module = registry.module("objective", objective)
    obj = module.Objective(module.Config(**settings(objective, modalities), **extra), encoders, objective)
    return Learner(encoders, {objective: obj})


def split(batch: dict, k: int) -> list[dict]:
    """``batch`` cut into ``k`` micro-batches of consecutive rows."""
    n = len(batch["__key__"])
    cuts = [n * i // k for i in range(k + 1)]

    def rows(v, a, b):
        if isinstance(v, torch.Tensor | list):
            return v[a:b]
        if isinstance(v, dict):
            return {key: rows(x, a, b) for key, x in v.items()}
        return v

    return [{key: rows(v, a, b) for key, v in batch.items()} for a, b in itertools.pairwise(cuts)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ALL = [(o, m) for o, combos in CASES.items() for m in combos]


def test_every_registered_objective_is_covered():
    assert sorted(CASES) == sorted(registry.names("objective"))


@pytest.mark.parametrize("objective, modalities", ALL, ids=[f"{o}-{'+'.join(m)}" for o, m in ALL])
def test_contract(objective, modalities, starter_tokenizer):
    """Finite loss, a gradient for every trainable parameter, and the loss falls within 30 steps."""
    batch = batch_for(objective, modalities, starter_tokenizer)
    model = learner(objective, modalities, starter_tokenizer)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert set(out["embeddings"]) == set(modalities)
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, f"no gradient reaches {missing}"

    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        model.after_step(step + 1, 30)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) < 0.9 * losses[0], f"loss did not fall: {losses[0]:.4f} → {losses[-5:]}"


@pytest.mark.parametrize("objective, modalities", ALL, ids=[f"{o}-{'+'.join(m)}" for o, m in ALL])
def test_bf16_autocast_matches_fp32(objective, modalities, starter_tokenizer):
    """Under bf16 autocast (``mixed_precision: bf16``): the fp32 loss to bf16 precision, and fp32
    gradients pointing where the fp32 ones do, for every trainable parameter."""
    batch = batch_for(objective, modalities, starter_tokenizer)
    model = learner(objective, modalities, starter_tokenizer)
    ref = model(batch)["loss"]
    ref.backward()
    full = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and out["loss"].item() != ref.item()  # autocast took effect …
    assert abs(out["loss"].item() - ref.item()) < 0.03 * abs(ref.item())  # … to bf16 precision
    out["loss"].backward()
    half = grads(model)
    assert half.keys() == full.keys()
    flat = {k: (half[k].flatten(), full[k].flatten()) for k in full}
    assert all(h.dtype == torch.float32 and torch.isfinite(h).all() for h, _ in flat.values())
    a, b = torch.cat([h for h, _ in flat.values()]), torch.cat([f for _, f in flat.values()])
    assert F.cosine_similarity(a, b, dim=0) > 0.99


@pytest.mark.parametrize("objective, modality", [("mae", "text"), ("mlm", "image"), ("mlm", "audio")])
def test_objective_rejects_a_modality_it_cannot_train(objective, modality, starter_tokenizer):
    with pytest.raises(ConfigError, match=f"objectives.{objective}.modality"):
        learner(objective, (modality,), starter_tokenizer)


def test_mlm_masking_statistics_match_the_collator(starter_tokenizer):
    """Our per-sample masking and transformers' DataCollatorForLanguageModeling on the same batch:
    the same share of tokens selected (15 %), replaced by [MASK] (80 %), by a random token (10 %)."""
    from transformers import DataCollatorForLanguageModeling

    batch = starter_batch(("text",), starter_tokenizer, n=512)
    model = learner("mlm", ("text",), starter_tokenizer)
    obj, enc = model.objectives["mlm"], model.encoders["text"]
    ids, maskable = batch["text"]["input_ids"], enc.maskable(batch["text"])

    def stats(masked, labels):
        sel = labels != -100
        assert not (sel & ~maskable).any(), "a special or padding token was selected"
        assert (labels[sel] == ids[sel]).all()
        mask = masked[sel] == enc.mask_token_id
        same = masked[sel] == ids[sel]
        return torch.tensor([sel.sum() / maskable.sum(), mask.float().mean(), (~mask & ~same).float().mean()])

    ours = stats(*obj.mask({**batch, "__step__": 3}))
    torch.manual_seed(0)
    collator = DataCollatorForLanguageModeling(enc.tokenizer, mlm_probability=0.15)
    theirs = stats(*collator.torch_mask_tokens(ids.clone(), ~maskable))
    # ~5k maskable tokens: a few binomial standard deviations
    assert torch.allclose(ours, theirs, atol=0.04), (ours, theirs)
    assert torch.allclose(ours, torch.tensor([0.15, 0.8, 0.1]), atol=0.04), ours
    again = obj.mask({**batch, "__step__": 3})[0]
    assert torch.equal(again, obj.mask({**batch, "__step__": 3})[0])  # a function of the step …
    assert not torch.equal(again, obj.mask({**batch, "__step__": 4})[0])  # … that changes with it


def test_clip_loss_equals_open_clip(starter_tokenizer):
    from open_clip.loss import ClipLoss

    batch = starter_batch(("image", "text"), starter_tokenizer)
    obj = learner("clip", ("image", "text"), starter_tokenizer).objectives["clip"]
    with torch.no_grad():
        ours = obj(batch)["loss"]
        fa, fb = obj.features(batch, "image"), obj.features(batch, "text")
        scale = obj.logit_scale.exp()
        theirs = ClipLoss()(fa, fb, scale)
        logits = scale * fa @ fb.T  # the textbook form, as a third opinion
        labels = torch.arange(len(fa))
        textbook = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(ours, textbook, atol=1e-5)


@pytest.mark.parametrize("objective, modalities", [("clip", ("image", "text")), ("clip", ("audio", "text")),
                                                   ("mae", ("image",)), ("data2vec", ("text",)),
                                                   ("joint", ("image",)), ("joint", ("text",))])
def test_accumulation_equals_one_big_batch(objective, modalities, starter_tokenizer):
    """k micro-batches (CLIP, joint: each contrasted with all k) give the big batch's loss and gradients."""
    batch = batch_for(objective, modalities, starter_tokenizer, step=5)
    model = learner(objective, modalities, starter_tokenizer)
    big = model(batch)["loss"]
    big.backward()
    expected = grads(model)
    model.zero_grad()
    k, total = 4, 0.0
    micro = split(batch, k)
    model.begin_step(micro)
    for mb in micro:
        loss = model(mb)["loss"] / k
        loss.backward()
        total += loss.item()
    got = grads(model)
    assert abs(total - big.item()) < 1e-5
    assert expected.keys() == got.keys()
    for name, want in expected.items():
        # fp32 summation order differs between the two; an element that is a small difference of
        # large terms (a LayerNorm bias summed over batch and positions) carries that rounding at
        # the scale of the parameter's larger gradients, so the bound is relative to those
        assert float((got[name] - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-6, name


def test_clip_without_the_cache_sees_only_its_micro_batch(starter_tokenizer):
    """The counter-test: micro-batches that skip ``begin_step`` contrast within themselves only,
    which is not the big batch's gradient (what the cache is there to fix)."""
    batch = {**starter_batch(("image", "text"), starter_tokenizer), "__step__": 5}
    model = learner("clip", ("image", "text"), starter_tokenizer)
    model(batch)["loss"].backward()
    expected = grads(model)
    model.zero_grad()
    model.begin_step([])
    for mb in split(batch, 4):
        (model(mb)["loss"] / 4).backward()
    got = grads(model)
    assert not all(torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-6) for n in expected)


def test_data2vec_teacher_follows_the_student_by_ema(starter_tokenizer):
    from pipeline.objectives.data2vec import ema_momentum

    assert ema_momentum(0, 0.99, 0.999, 10) == 0.99 and ema_momentum(10, 0.99, 0.999, 10) == 0.999
    assert ema_momentum(5, 0.99, 0.999, 10) == pytest.approx(0.9945)
    model = learner("data2vec", ("image",), starter_tokenizer, ema_start=0.9, ema_end=0.9)
    obj, enc = model.objectives["data2vec"], model.encoders["image"]
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    name = "model.embeddings.patch_embeddings.projection.weight"
    student = dict(enc.named_parameters())[name]
    teacher = dict(obj.teacher.named_parameters())[name]
    before = teacher.detach().clone()
    with torch.no_grad():
        student.add_(1.0)
    model.after_step(1, 10)
    assert torch.allclose(teacher, 0.9 * before + 0.1 * student)
    model.train()
    assert not obj.teacher.training  # the teacher's targets never see dropout


def test_mae_decoder_runs_its_last_block_at_hidden_patches_only(starter_tokenizer):
    """The shortcut changes no number: the last block at the hidden rows gives what the full block
    gives there, and the loss equals the textbook one over the full decoder output."""
    from pipeline.encoders.base import take

    model = learner("mae", ("image",), starter_tokenizer)
    mae, enc = model.objectives["mae"], model.encoders["image"]
    batch = {**starter_batch(("image",), starter_tokenizer), "__step__": 0}
    got = model(batch)["loss"]
    order = mae.noise(batch, enc.num_patches).argsort(dim=1)
    latent = enc(batch["image"], keep=order[:, : mae.num_keep]).last_hidden_state
    h = mae.embed(latent)
    hidden = torch.ones(order.shape, dtype=torch.bool).scatter_(1, order[:, : mae.num_keep], False)  # [B, N]
    # the decoder's input in grid order: each kept latent at its patch, the mask token elsewhere
    grid = mae.mask_token.expand(*order.shape, -1).clone()
    grid = grid.scatter(1, order[:, : mae.num_keep, None].expand(-1, -1, h.shape[-1]), h[:, 1:])
    full = torch.cat([h[:, :1], grid], dim=1) + mae.pos
    for block in mae.blocks:
        full = block(full)
    pred = mae.head(mae.norm(full))[:, 1:]  # [B, N, P] every patch
    target = enc.patchify(batch["image"])
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    want = ((pred - target).pow(2).mean(-1) * hidden).sum() / hidden.sum()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    rows = order[:, mae.num_keep:] + 1
    x = torch.randn(4, 1 + enc.num_patches, mae.cfg.decoder_width)
    assert torch.allclose(mae.blocks[0](x, rows[:4]), take(mae.blocks[0](x), rows[:4]), atol=1e-5)
