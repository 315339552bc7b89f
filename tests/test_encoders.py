"""Encoders, for every registered modality: shapes, the visible-only (``keep``) and mask-token
(``mask``) forwards against the plain one, gradients, SDPA, size presets, config errors, and the
export contract: stock ``transformers.AutoModel`` loads ``save_pretrained`` and computes the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from pipeline import registry
from pipeline.config import ConfigError, build
from pipeline.encoders.base import PRESETS, EncoderConfig, rows_of, take
from pipeline.encoders.vit import ViTEncoder

CFG = EncoderConfig(size="tiny", patch_size=8)


#: per modality: a small config and raw items fed through ``encode``, ``decode``, ``transform``, ``collate``
SETUPS = {
    "image": lambda tok: ({"size": 32, "channels": 3},
                          [np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8) for i in range(3)]),
    "text": lambda tok: ({"tokenizer": tok, "max_length": 16},
                         ["the red fox", "small birds sing in green trees at night over the lazy dog", "a dog"]),
    "audio": lambda tok: ({"n_mels": 32, "clip_seconds": 0.5},  # 51 frames: the encoder keeps 48 (patch 8)
                          [((torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1).numpy(), 16000)
                           for n in (8000, 6000, 9000)]),
}


@pytest.fixture(scope="module", params=registry.names("modality"))
def case(request, starter_tokenizer):
    """(modality, batch) for one registered modality."""
    name = request.param
    if name not in SETUPS:
        pytest.fail(f"modality {name!r}: add a small config and sample items to SETUPS in tests/test_encoders.py")
    settings, raw = SETUPS[name](starter_tokenizer)
    cls = registry.modality(name)
    modality = cls(cls.Config(**settings))
    raw = [modality.decode(*reversed(modality.encode(x))) for x in raw]  # raw item → shard bytes → decoded
    return modality, modality.collate([modality.transform(x, None) for x in raw])


def encoder(modality, cfg: EncoderConfig = CFG, seed: int = 0):
    torch.manual_seed(seed)
    return modality.encoder(cfg)


def batch_size(batch) -> int:
    return (batch["input_ids"] if isinstance(batch, dict) else batch).shape[0]


def random_mask(enc, batch, seed: int = 1) -> torch.Tensor:
    """[B, N] bool: about half of the maskable positions."""
    g = torch.Generator().manual_seed(seed)
    allowed = enc.maskable(batch)
    return allowed & (torch.rand(allowed.shape, generator=g) < 0.5)


def test_shapes_and_hidden_states(case):
    modality, batch = case
    enc = encoder(modality)
    out = enc(batch)
    b, n, d = batch_size(batch), enc.num_tokens(batch), enc.hidden_size
    assert (d, enc.num_layers) == (192, 4)
    assert out.last_hidden_state.shape == (b, enc.num_prefix_tokens + n, d)
    assert out.tokens.shape == (b, n, d) and out.pooled.shape == (b, d)
    assert len(out.hidden_states) == enc.num_layers + 1
    assert all(h.shape == out.last_hidden_state.shape for h in out.hidden_states)
    assert enc.maskable(batch).shape == (b, n)
    # the same hidden states as the stock model's own forward
    stock = enc.model(**enc.model_inputs(batch), output_hidden_states=True)
    assert torch.equal(stock.last_hidden_state, out.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(stock.hidden_states, out.hidden_states, strict=True))


def test_pooling(case):
    modality, batch = case
    mean, cls = encoder(modality)(batch), encoder(modality, CFG.model_copy(update={"pooling": "cls"}))(batch)
    assert torch.equal(cls.pooled, cls.last_hidden_state[:, 0])  # [CLS] (ViT) or the tokenizer's first token
    if mean.attention_mask is None:  # ViT: mean of the patch states, [CLS] left out
        assert torch.allclose(mean.pooled, mean.tokens.mean(1), atol=1e-6)
    else:  # text: mean of the real tokens, padding left out
        for i, n in enumerate(mean.attention_mask.sum(1).tolist()):
            assert torch.allclose(mean.pooled[i], mean.last_hidden_state[i, :n].mean(0), atol=1e-6)


def test_keep_runs_on_visible_positions_only(case):
    modality, batch = case
    enc = encoder(modality)
    if not isinstance(enc, ViTEncoder):
        with pytest.raises(NotImplementedError, match="mask them instead"):
            enc(batch, keep=torch.zeros(batch_size(batch), 1, dtype=torch.long))
        return
    full = enc(batch)
    b, n = batch_size(batch), enc.num_tokens(batch)
    every = torch.arange(n).expand(b, n)
    assert torch.allclose(enc(batch, keep=every).last_hidden_state, full.last_hidden_state, atol=1e-5)
    # a shuffled keep gives the same patch states, shuffled: each patch keeps its position embedding
    order = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(b)])
    shuffled = enc(batch, keep=order)
    assert torch.allclose(shuffled.tokens, torch.gather(full.tokens, 1, order[..., None].expand(-1, -1, enc.hidden_size)),
                          atol=1e-5)
    few = enc(batch, keep=order[:, : n // 4])
    assert few.last_hidden_state.shape == (b, 1 + n // 4, enc.hidden_size)
    assert len(few.hidden_states) == enc.num_layers + 1 and few.pooled.shape == (b, enc.hidden_size)


def test_mask_token_forward(case):
    modality, batch = case
    enc = encoder(modality)
    full = enc(batch)
    none = torch.zeros(batch_size(batch), enc.num_tokens(batch), dtype=torch.bool)
    assert torch.equal(enc(batch, mask=none).last_hidden_state, full.last_hidden_state)
    mask = random_mask(enc, batch)
    assert mask.any()
    masked = enc(batch, mask=mask)
    assert not torch.allclose(masked.last_hidden_state, full.last_hidden_state)
    # the stock model's own masking gives the same states
    inputs = enc.model_inputs(batch)
    if isinstance(enc, ViTEncoder):
        stock = enc.model(**inputs, bool_masked_pos=mask)
    else:
        stock = enc.model(**{**inputs, "input_ids": inputs["input_ids"].masked_fill(mask, enc.mask_token_id)})
    assert torch.allclose(stock.last_hidden_state, masked.last_hidden_state, atol=1e-6)


def test_rows_evaluate_the_last_layer_where_asked(case):
    """``rows=``: the states (and gradients) at the requested rows equal the full forward's there,
    padded rows included; the layers below are untouched."""
    modality, batch = case
    enc = encoder(modality)
    mask = random_mask(enc, batch)
    rows, valid = rows_of(mask, enc.num_prefix_tokens)
    assert valid.sum() == mask.sum() and rows.shape[1] == mask.sum(1).max()
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(*rows.shape, enc.hidden_size, generator=g)
    results = []
    for kwargs in ({}, {"rows": rows}):
        enc.zero_grad()
        out = enc(batch, mask=mask, **kwargs)
        picked = out.last_hidden_state if kwargs else take(out.last_hidden_state, rows)
        (picked * weights).sum().backward()
        results.append((out, picked, {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (full, want, want_grads), (part, got, got_grads) = results
    assert got.shape == (batch_size(batch), rows.shape[1], enc.hidden_size)
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(got[valid], full.tokens[mask]) or (got[valid] - full.tokens[mask]).abs().max() < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(full.hidden_states[:-1], part.hidden_states[:-1], strict=True))
    assert (part.hidden_states[-1] - take(full.hidden_states[-1], rows)).abs().max() < 1e-5
    assert got_grads.keys() == want_grads.keys()
    # fp32 rounding, relative to each parameter's largest gradient; the floor is for key biases,
    # whose true gradient is exactly zero (softmax ignores a shift shared by all keys)
    assert all(float((got_grads[n] - want).abs().max()) <= 1e-5 * float(want.abs().max()) + 1e-5
               for n, want in want_grads.items())


def test_embed_is_the_pooled_embedding(case):
    modality, batch = case
    for pooling in ("mean", "cls"):
        enc = encoder(modality, CFG.model_copy(update={"pooling": pooling}))
        assert (enc.embed(batch) - enc(batch).pooled).abs().max() < 1e-5, pooling


def test_maskable_positions(case):
    modality, batch = case
    enc = encoder(modality)
    allowed = enc.maskable(batch)
    if isinstance(batch, dict):  # text: never padding, [CLS] or [SEP]
        tok = modality.tokenizer
        assert not allowed[batch["attention_mask"] == 0].any()
        assert not allowed[:, 0].any() and not allowed[batch["input_ids"] == tok.sep_token_id].any()
        assert allowed.sum(1).tolist() == (batch["attention_mask"].sum(1) - 2).tolist()
    else:
        assert allowed.all()


def grads(enc, batch, **kwargs) -> dict[str, torch.Tensor | None]:
    enc.zero_grad()
    out = enc(batch, **kwargs)
    g = torch.Generator().manual_seed(0)  # random directions: a plain sum of LayerNorm outputs has tiny gradients
    loss = (out.pooled * torch.randn(out.pooled.shape, generator=g)).sum() + \
        (out.last_hidden_state * torch.randn(out.last_hidden_state.shape, generator=g)).sum()
    loss.backward()
    return {name: p.grad for name, p in enc.named_parameters()}


#: parameters a forward without ``mask`` does not use (MAE, CLIP, probes): the ViT mask token.
#: Text masks by swapping ids for [MASK], a row of the word embeddings, so it has none.
UNUSED_WITHOUT_MASK = {"model.embeddings.mask_token"}


def test_gradients_reach_every_parameter(case):
    modality, batch = case
    enc = encoder(modality)
    got = grads(enc, batch)
    missing = {name for name, g in got.items() if g is None or not g.abs().sum() > 0}
    assert missing <= UNUSED_WITHOUT_MASK
    got = grads(enc, batch, mask=random_mask(enc, batch))
    assert all(g is not None and g.abs().sum() > 0 for g in got.values())


def test_export_loads_with_stock_automodel(case, tmp_path):
    modality, batch = case
    enc = encoder(modality).eval()
    enc.save_pretrained(tmp_path)
    stock = AutoModel.from_pretrained(tmp_path)
    assert type(stock) is type(enc.model)
    assert stock.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ours, theirs = enc(batch), stock(**enc.model_inputs(batch), output_hidden_states=True)
    assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max() < 1e-5
    assert max((a - b).abs().max() for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True)) < 1e-5


def test_attention_is_sdpa(case, monkeypatch):
    modality, batch = case
    enc = encoder(modality)
    assert enc.model.config._attn_implementation == "sdpa"
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    enc(batch)
    assert len(calls) == enc.num_layers


def test_init_from_loads_earlier_weights(case, tmp_path):
    modality, batch = case
    first = encoder(modality, seed=1)
    first.save_pretrained(tmp_path / "stage1")
    second = encoder(modality, CFG.model_copy(update={"init_from": str(tmp_path / "stage1")}), seed=2)
    mask = random_mask(first, batch)
    assert torch.equal(second(batch).last_hidden_state, first(batch).last_hidden_state)
    assert torch.equal(second(batch, mask=mask).pooled, first(batch, mask=mask).pooled)  # mask token too
    deeper = CFG.model_copy(update={"init_from": str(tmp_path / "stage1"), "num_layers": 2})
    with pytest.raises(ConfigError, match=r"init_from: .* num_hidden_layers 4, this encoder has 2"):
        modality.encoder(deeper)
    with pytest.raises(ConfigError, match="no config.json"):
        modality.encoder(CFG.model_copy(update={"init_from": str(tmp_path / "nowhere")}))


def test_patches(case):
    modality, batch = case
    enc = encoder(modality)
    if not isinstance(enc, ViTEncoder):
        with pytest.raises(NotImplementedError, match="MAE"):
            enc.patchify(batch)
        return
    p, c = enc.patch_size, enc.channels
    patches = enc.patchify(batch)
    assert patches.shape == (batch_size(batch), enc.num_patches, p * p * c)
    x = enc.model_inputs(batch)["pixel_values"]
    assert torch.equal(enc.unpatchify(patches), x)
    # patch n of the targets is token n of the model: perturb one patch, only that token's embedding moves
    n = enc.num_patches - 2
    bumped = enc.unpatchify(patches.index_add(1, torch.tensor([n]), torch.ones(x.shape[0], 1, p * p * c)))
    with torch.no_grad():
        moved = (enc.model.embeddings.patch_embeddings(bumped) - enc.model.embeddings.patch_embeddings(x)).abs().sum(-1)
    assert moved[:, n].gt(0).all() and moved.gt(0).sum() == x.shape[0]


def test_audio_drops_frames_that_fill_no_patch():
    audio = registry.modality("audio")
    modality = audio(audio.Config(n_mels=32, clip_seconds=0.5))
    enc = encoder(modality)
    assert modality.num_frames == 51 and enc.image_size == (32, 48) and enc.grid == (4, 6)
    x = torch.randn(2, 1, 32, 51)
    y = x.clone()
    y[..., 48:] = 7.0
    assert torch.equal(enc(x).last_hidden_state, enc(y).last_hidden_state)


def test_size_presets():
    assert {k: v["hidden_size"] for k, v in PRESETS.items()} == {"tiny": 192, "small": 384, "base": 768}
    image = registry.modality("image")
    modality = image(image.Config(size=32))
    for size, dims in PRESETS.items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            enc = modality.encoder(EncoderConfig(size=size))
        assert (enc.hidden_size, enc.num_layers, enc.model.config.num_attention_heads) == \
            (dims["hidden_size"], dims["num_layers"], dims["num_heads"])
        assert enc.model.layers[0].mlp.fc1.out_features == 4 * dims["hidden_size"]
    assert EncoderConfig(size="small", hidden_size=256, num_heads=4).resolved()["hidden_size"] == 256


@pytest.mark.parametrize("data, message", [
    ({"size": "huge"}, "encoder: size: Input should be 'tiny', 'small' or 'base'"),
    ({"hiden_size": 64}, "encoder: unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
    ({"pooling": "max"}, "encoder: pooling: Input should be 'mean' or 'cls'"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        build(EncoderConfig, data, "encoder")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bad_sizes_are_config_errors():
    image = registry.modality("image")
    with pytest.raises(ConfigError, match=r"^encoder.hidden_size: 100 is not divisible by num_heads 3$"):
        image(image.Config(size=32)).encoder(EncoderConfig(hidden_size=100))
    with pytest.raises(ConfigError, match=r"^encoder.patch_size: 16 does not tile the 28×28 input"):
        image(image.Config(size=28)).encoder(EncoderConfig())


# ---------------------------------------------------------------- saved encoder directories and heads


def _two_stage_recipe(tmp_path: Path, second_encoders: dict, second_modalities: dict | None = None) -> Path:
    """A recipe whose first stage trains a ViT with patch 4 and [CLS] pooling (MAE), and whose
    second starts an image–text CLIP stage from it with the given encoder settings."""
    import yaml
    from conftest import STARTER

    recipe = {
        "name": "chain",
        "sources": {"emoji": {"shards": str(STARTER / "emoji" / "test"), "modalities": ["image", "text"]}},
        "modalities": {"image": {"size": 32}, "text": {"tokenizer": "{run}/tokenize", "max_length": 16},
                       **(second_modalities or {})},
        "stages": [
            {"name": "tokenize", "shards": [str(STARTER / "emoji" / "test")], "vocab_size": 300},
            {"name": "a", "stage": "pretrain", "sources": ["emoji"], "steps": 2,
             "objectives": {"mae": {"decoder_width": 32, "decoder_heads": 2, "decoder_layers": 1}},
             "encoders": {"image": {**TINY_SAVED, "patch_size": 4, "pooling": "cls"}},
             "loader": {"batch_size": 8, "num_workers": 0}},
            {"name": "b", "stage": "pretrain", "sources": ["emoji"], "steps": 2, "objectives": {"clip": {}},
             "encoders": {"image": {"init_from": "{run}/a/encoders/image", **second_encoders},
                          "text": TINY_SAVED},
             "loader": {"batch_size": 8, "num_workers": 0}},
        ],
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


TINY_SAVED = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


def test_a_saved_encoder_carries_its_settings_and_its_heads_give_the_same_features(tmp_path):
    """The second stage names only ``init_from``: patch size, pooling and width come from the
    first stage's ``selfsup.json``. The CLIP heads load back around the saved encoders and
    compute the features the training-time objective computed."""
    from pipeline.encoders import saved
    from pipeline.runner import run_recipe

    run = run_recipe(_two_stage_recipe(tmp_path, {}), runs=tmp_path / "runs", progress=False)
    info = saved.settings(run / "b" / "encoders" / "image")
    assert info["modality"] == "image" and info["encoder"]["patch_size"] == 4 and info["encoder"]["pooling"] == "cls"
    assert info["modality_settings"]["size"] == 32
    text_info = saved.settings(run / "b" / "encoders" / "text")
    assert text_info["modality_settings"]["tokenizer"] == "."  # the tokenizer travels with the encoder

    mods, encoders = {}, {}
    for m in ("image", "text"):
        mods[m], encoders[m] = saved.load(run / "b" / "encoders" / m)  # from the directory alone
    assert encoders["image"].patch_size == 4 and encoders["image"].cfg.pooling == "cls"
    clip = saved.load_heads(run / "b" / "heads" / "clip", encoders)
    assert sorted(p.name for p in (run / "b" / "heads").iterdir()) == ["clip"]

    # the training-time objective, rebuilt from the last checkpoint's weights
    from safetensors.torch import load_file

    from pipeline.objectives import clip as clip_module
    from pipeline.train.learner import Learner

    fresh = {m: saved.load(run / "a" / "encoders" / m)[1] if m == "image" else mods[m].encoder(encoders[m].cfg)
             for m in ("image", "text")}
    learner = Learner(fresh, {"clip": clip_module.Objective(clip.cfg, fresh, "clip")})
    learner.load_state_dict(load_file(run / "b" / "checkpoints" / "step_00000002" / "model.safetensors"))
    learner.eval()
    batch = {"image": mods["image"].collate([mods["image"].transform(mods["image"].decode(_emoji_png(i), "png"), None)
                                             for i in range(4)]),
             "text": mods["text"].collate([mods["text"].transform(t, None) for t in ("cat", "dog", "red apple", "sun")])}
    with torch.no_grad():
        for m in ("image", "text"):
            assert torch.allclose(clip.features(batch, m), learner.objectives["clip"].features(batch, m), atol=1e-6)


def _emoji_png(i: int) -> bytes:
    from conftest import STARTER

    from pipeline.data.shards import iter_samples, open_shards

    shard = open_shards(str(STARTER / "emoji" / "test")).shards[0].path
    return next(s for j, s in enumerate(iter_samples(shard)) if j == i)["png"]


@pytest.mark.parametrize("setting, message", [
    ({"patch_size": 8}, r"encoders.image.patch_size: 8 disagrees with 4 in .*selfsup.json"),
    ({"num_layers": 2}, r"encoders.image.num_layers: 2 disagrees with 1 in "),
])
def test_a_setting_that_disagrees_with_the_saved_encoder_is_one_line_naming_it(tmp_path, setting, message):
    from pipeline.runner import run_recipe

    with pytest.raises(ConfigError, match=message) as err:
        run_recipe(_two_stage_recipe(tmp_path, setting), runs=tmp_path / "runs", progress=False)
    assert "\n" not in str(err.value)


def test_free_settings_may_differ_modality_settings_must_agree(tmp_path):
    """Pooling and dropout shape no weight: a later stage may change them. An image size other than
    the one the encoder was trained at is a one-line error naming the modality setting."""
    from modalities.image import ImageConfig
    from pipeline.encoders import saved
    from pipeline.runner import run_recipe

    recipe = _two_stage_recipe(tmp_path, {"pooling": "mean", "dropout": 0.1})
    run = run_recipe(recipe, ["stages.b.steps=1"], runs=tmp_path / "runs", progress=False)
    assert saved.settings(run / "b" / "encoders" / "image")["encoder"]["pooling"] == "mean"
    start = run / "a" / "encoders" / "image"
    with pytest.raises(ConfigError, match=r"modalities.image.size: 64 disagrees with 32 the encoder .* was trained with"):
        saved.merge(start, EncoderConfig(), ImageConfig(size=64), "image", "encoders.image")
    merged, mcfg = saved.merge(start, EncoderConfig(), ImageConfig(size=32, hflip=False), "image", "encoders.image")
    assert merged.patch_size == 4 and mcfg.size == 32 and mcfg.hflip is False


def test_augmentation_is_each_stages_own(tmp_path):
    """A stage's ``augment`` changes its own views only: the stage that starts from its encoder
    trains with the recipe's augmentation, not the saved one; a setting that is not augmentation
    is a one-line error naming it."""
    import yaml

    from pipeline.encoders import saved
    from pipeline.runner import run_recipe

    path = _two_stage_recipe(tmp_path, {})
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"][1]["augment"] = {"image": {"crop_scale": [0.1, 0.5], "brightness": 0.3}}
    path.write_text(yaml.safe_dump(recipe))
    run = run_recipe(path, ["stages.b.steps=1"], runs=tmp_path / "runs", progress=False)
    first = saved.settings(run / "a" / "encoders" / "image")["modality_settings"]
    second = saved.settings(run / "b" / "encoders" / "image")["modality_settings"]
    assert first["crop_scale"] == [0.1, 0.5] and first["brightness"] == 0.3 and first["size"] == 32
    assert second["crop_scale"] == [0.35, 1.0] and second["brightness"] == 0.0
    recipe["stages"][1]["augment"] = {"image": {"size": 64}}
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"augment.image.size: not an augmentation setting of image \(brightness, "):
        run_recipe(path, runs=tmp_path / "runs2", progress=False)


def test_a_plain_stock_directory_still_loads(tmp_path):
    """A ViT saved by transformers itself (no ``selfsup.json``) loads with settings from its config."""
    from transformers import ViTConfig, ViTModel

    from pipeline.encoders import saved

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3)).save_pretrained(tmp_path / "vit")
    mod, enc = saved.load(tmp_path / "vit")
    assert mod.name == "image" and mod.cfg.size == 16 and enc.patch_size == 4 and enc.hidden_size == 32
    assert enc.embed(torch.zeros(2, 3, 16, 16)).shape == (2, 32)
    with pytest.raises(ConfigError, match="not an encoder directory"):
        saved.load(tmp_path)
