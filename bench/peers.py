"""The field's implementations of each benchmarked objective, and the ``Side`` both they and ours
are timed through (``bench/objectives.py`` builds ours and runs the comparison).

Each peer is built from a config at the dims ``bench/objectives.py`` hands over, with the
settings ours uses (``mae_settings``, ``clip_text``, ``D2V_MASK``, ``EMA``), and trained with the same AdamW over the same
parameter grouping as ours (``Side.ready``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.train.loop import OptimConfig, param_groups

#: MAE's mask ratio, both sides
MAE_MASK = 0.75


def mae_settings(dims: dict) -> dict:
    """Our MAE settings for the size's decoder (width, depth, heads; MLP 4× width)."""
    width, layers, heads = dims["decoder"]
    return {"mask_ratio": MAE_MASK, "decoder_width": width, "decoder_layers": layers, "decoder_heads": heads}


def clip_text(dims: dict) -> dict:
    """The dims of a CLIP pair's text tower: the size's own, or its ``clip_text`` overrides
    (CLIP B/16's text tower is 512 wide with 8 heads over 77 tokens of a 49,408 vocabulary)."""
    return {**dims, **dims.get("clip_text", {})}
#: our data2vec defaults, which the peers copy: mask ratio per modality, EMA momentum
D2V_MASK = {"image": 0.6, "text": 0.15}
EMA = 0.999


@dataclass
class Side:
    """One implementation of one objective: ``loss(step)`` runs the forward, ``after(step)`` the
    state updates outside the gradient; ``module`` holds every trained parameter."""

    module: nn.Module
    loss: Callable[[int], torch.Tensor]
    after: Callable[[int], None] = lambda step: None

    def ready(self, device: str) -> Side:
        """Weights onto ``device``, then the optimizer over them (the trainer's settings)."""
        o = OptimConfig()
        self.module.to(device).train()
        self.opt = torch.optim.AdamW(param_groups(self.module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        return self

    def step(self, step: int, autocast) -> torch.Tensor:
        with autocast():
            loss = self.loss(step)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.after(step + 1)
        return loss.detach()


def peer_mae(dims: dict, batch: dict) -> Side:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    d, mae = dims["width"], mae_settings(dims)
    cfg = ViTMAEConfig(hidden_size=d, num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                       intermediate_size=4 * d, image_size=dims["image"], patch_size=dims["patch"], num_channels=3,
                       layer_norm_eps=1e-6, mask_ratio=mae["mask_ratio"], norm_pix_loss=True,
                       decoder_hidden_size=mae["decoder_width"], decoder_num_hidden_layers=mae["decoder_layers"],
                       decoder_num_attention_heads=mae["decoder_heads"], decoder_intermediate_size=4 * mae["decoder_width"],
                       attn_implementation="sdpa")
    model = ViTMAEForPreTraining(cfg)
    return Side(model, lambda step: model(pixel_values=batch["image"]).loss)


def peer_mlm(dims: dict, batch: dict, tokenizer) -> Side:
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling

    d = dims["width"]
    cfg = BertConfig(vocab_size=dims["vocab"], hidden_size=d, num_hidden_layers=dims["layers"],
                     num_attention_heads=dims["heads"], intermediate_size=4 * d, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                     max_position_embeddings=max(512, dims["seq"]), attn_implementation="sdpa")
    model = BertForMaskedLM(cfg)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    text = batch["text"]
    # the collator runs on the host, in the DataLoader: it gets the ids before they reach the device
    host_ids = text["input_ids"].cpu()
    special = torch.isin(host_ids, torch.tensor(tokenizer.all_special_ids))
    dev = text["input_ids"].device

    def loss(step: int) -> torch.Tensor:
        ids, labels = collator.torch_mask_tokens(host_ids.clone(), special_tokens_mask=special)
        return model(input_ids=ids.to(dev), attention_mask=text["attention_mask"], labels=labels.to(dev)).loss

    return Side(model, loss)


def peer_clip(dims: dict, batch: dict) -> Side:
    import open_clip
    from open_clip.loss import ClipLoss

    d, t = dims["width"], clip_text(dims)
    vision = {"image_size": dims["image"], "layers": dims["layers"], "width": d, "head_width": d // dims["heads"],
              "mlp_ratio": 4.0, "patch_size": dims["patch"]}
    text = {"context_length": t["seq"], "vocab_size": t["vocab"], "width": t["width"], "heads": t["heads"],
            "layers": t["layers"], "mlp_ratio": 4.0}
    # the shared space is as wide as the narrower tower, as ours defaults to
    model = open_clip.CLIP(embed_dim=min(d, t["width"]), vision_cfg=vision, text_cfg=text, output_dict=True)
    clip_loss = ClipLoss()

    def loss(step: int) -> torch.Tensor:
        out = model(batch["image"], batch["text"]["input_ids"])
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    return Side(model, loss)


class Data2VecPeer(nn.Module):
    """data2vec as its papers and reference code describe it, on a stock transformers model: an
    EMA teacher on the full input, targets = mean over the top-K layer outputs, each instance-
    normalized over positions; the student sees masked input and regresses through a linear head."""

    def __init__(self, student: nn.Module, top_k: int, prefix: int):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False).eval()
        self.head = nn.Linear(student.config.hidden_size, student.config.hidden_size)
        self.top_k, self.prefix = top_k, prefix

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, inputs: dict, masked_inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, N] bool over the positions after the prefix ([CLS] of the ViT)."""
        with torch.no_grad():
            states = self.teacher(**inputs, output_hidden_states=True).hidden_states[-self.top_k:]
            # instance norm: per sample and channel over positions ([B, D, N] for F.instance_norm)
            layers = [F.instance_norm(h[:, self.prefix:].float().transpose(1, 2)).transpose(1, 2) for h in states]
            target = torch.stack(layers).mean(0)  # [B, N, D]
        out = self.student(**masked_inputs).last_hidden_state[:, self.prefix:]
        pred = self.head(out[mask]).float()  # [M, D]
        return F.mse_loss(pred, target[mask])

    @torch.no_grad()
    def ema(self, momentum: float) -> None:
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s, 1 - momentum)


def _d2v_dims(dims: dict) -> dict:
    """Data2Vec*Config settings shared by both modalities: the dims ours has, no dropout, SDPA."""
    return {"hidden_size": dims["width"], "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"],
            "intermediate_size": 4 * dims["width"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "attn_implementation": "sdpa"}


def _d2v_side(model: Data2VecPeer, maskable: torch.Tensor, views, ratio: float) -> Side:
    """A student/teacher step: random mask over ``maskable`` [B, N]; ``views(mask)`` gives the
    teacher's and the student's inputs."""
    def loss(step: int) -> torch.Tensor:
        mask = (torch.rand(maskable.shape, device=maskable.device) < ratio) & maskable
        full, masked = views(mask)
        return model(full, masked, mask)

    return Side(model, loss, lambda step: model.ema(EMA))


def peer_data2vec_image(dims: dict, batch: dict, tokenizer) -> Side:
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    # absolute positions, no layer scale / relative bias / drop path: the plain ViT ours is
    cfg = Data2VecVisionConfig(**_d2v_dims(dims), image_size=dims["image"], patch_size=dims["patch"], num_channels=3,
                               layer_norm_eps=1e-6, use_mask_token=True, use_absolute_position_embeddings=True,
                               use_relative_position_bias=False, layer_scale_init_value=0.0, drop_path_rate=0.0,
                               use_mean_pooling=False)
    model = Data2VecPeer(Data2VecVisionModel(cfg, add_pooling_layer=False), max(1, dims["layers"] // 2), prefix=1)
    x = batch["image"]
    maskable = torch.ones(x.shape[0], (dims["image"] // dims["patch"]) ** 2, dtype=torch.bool, device=x.device)
    return _d2v_side(model, maskable, lambda mask: ({"pixel_values": x}, {"pixel_values": x, "bool_masked_pos": mask}),
                     D2V_MASK["image"])


def peer_data2vec_text(dims: dict, batch: dict, tokenizer) -> Side:
    from transformers import Data2VecTextConfig, Data2VecTextModel

    cfg = Data2VecTextConfig(**_d2v_dims(dims), vocab_size=dims["vocab"], pad_token_id=tokenizer.pad_token_id,
                             max_position_embeddings=max(512, dims["seq"]) + 2)  # RoBERTa positions start at pad + 1
    model = Data2VecPeer(Data2VecTextModel(cfg, add_pooling_layer=False), max(1, dims["layers"] // 2), prefix=0)
    text = batch["text"]
    ids = text["input_ids"]
    maskable = ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids, device=ids.device))
    return _d2v_side(model, maskable, lambda mask: (text, {**text, "input_ids": ids.masked_fill(mask, tokenizer.mask_token_id)}),
                     D2V_MASK["text"])


#: the peer of each benchmarked objective: (dims, batch, tokenizer) → Side
PEERS = {
    "mae": lambda dims, batch, tok: peer_mae(dims, batch),
    "mlm": peer_mlm,
    "clip": lambda dims, batch, tok: peer_clip(dims, batch),
    "data2vec-image": peer_data2vec_image,
    "data2vec-text": peer_data2vec_text,
}


def peer(name: str, dims: dict, batch: dict, tokenizer) -> Side:
    return PEERS[name](dims, batch, tokenizer)
