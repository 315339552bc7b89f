"""The three pretraining runs of ``bench/learning.py``, each under the same ``Clock``.

- ``run_ours``: a pretrain stage of a recipe, assembled as ``stages/pretrain.py`` ``run`` does it
  (objectives, encoders, ``Learner``, ``StreamingLoader``) and trained by ``pipeline.train.loop.train``,
  whose ``probe=`` hook is the clock;
- ``run_vitmae``: transformers ``ViTMAEForPreTraining`` under the stock ``Trainer`` with the
  settings of the transformers image-pretraining example (``run_mae.py``), the clock a ``TrainerCallback``;
- ``run_simclr``: lightly's ``SimCLRTransform``, ``SimCLRProjectionHead`` and ``NTXentLoss`` on a
  stock transformers ``ViTModel``, in the plain loop of lightly's examples.

Each returns a ``Clock``: the encoder's weights at minute 0 (random init) and at every mark of
training time, plus the time of every step. The peers read the same shards through webdataset
and their own transforms.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

#: run_mae.py / the MAE paper: mask ratio, base learning rate (× batch / 256), AdamW, weight decay,
#: warmup share of the steps, random-resized-crop area range
MAE = {"mask_ratio": 0.75, "base_lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "warmup": 0.05,
       "crop_scale": (0.2, 1.0)}
#: the SimCLR peer: AdamW, warmup share, projection output width, NT-Xent temperature (lightly's default)
SIMCLR = {"lr": 1e-3, "weight_decay": 0.05, "warmup": 0.05, "out_dim": 128, "temperature": 0.5}
#: ``SimCLRTransform`` settings for small grey images (``simclr_transform`` says why); the rest are lightly's
SIMCLR_VIEWS = {"cj_strength": 0.5, "cj_sat": 0.0, "cj_hue": 0.0, "random_gray_scale": 0.0, "gaussian_blur": 0.0}
#: samples held by the peers' webdataset shuffle buffer
SHUFFLE = 1000


class BudgetSpent(Exception):
    """Raised by the clock inside ``train`` once the last mark is snapshotted: the run is over."""


class Clock:
    """Training time (its own snapshot time excluded) and the encoder snapshots at the marks.

    ``due(step)`` / ``__call__(learner, device)`` is the training loop's probe hook; the peers call
    ``due`` and ``take`` themselves. ``weights()`` returns the encoder's state dict."""

    def __init__(self, marks_s: list[float], weights):
        self.marks, self.weights = sorted(marks_s), weights
        self.snapshots: list[dict] = []
        self.times: list[tuple[int, float]] = []  # (step, training seconds) after every step
        self.initial = _clone(weights())
        self.start, self.paused, self.step = time.perf_counter(), 0.0, 0

    def restart(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    @property
    def done(self) -> bool:
        return len(self.snapshots) >= len(self.marks)

    def due(self, step: int) -> bool:
        self.step = step
        t = self.elapsed()
        self.times.append((step, t))
        return not self.done and t >= self.marks[len(self.snapshots)]

    def take(self, final: bool = False) -> None:
        """Snapshot for every mark reached (for the marks left, with ``final``: the run ended first)."""
        t0 = time.perf_counter()
        t = t0 - self.start - self.paused
        state = None
        while not self.done and (final or t >= self.marks[len(self.snapshots)]):
            state = state or _clone(self.weights())
            self.snapshots.append({"mark_s": self.marks[len(self.snapshots)], "train_s": t, "step": self.step,
                                   "state": state, "short": t < self.marks[len(self.snapshots)]})
        self.paused += time.perf_counter() - t0

    def __call__(self, learner, device) -> dict:
        self.take()
        if self.done:
            raise BudgetSpent
        return {"bench/train_s": self.elapsed()}

    def rate(self) -> tuple[float, float]:
        """(steps per second after the first step, seconds to the first step); with too few steps
        for that, (steps per second from the start, 0)."""
        (s1, t1), (sn, tn) = self.times[0], self.times[-1]
        if sn - s1 < 2 or tn <= t1:
            return sn / max(tn, 1e-9), 0.0
        return (sn - s1) / (tn - t1), t1


def _clone(state: dict) -> dict:
    return {k: v.detach().clone().cpu() for k, v in state.items()}


def planned_steps(clock: Clock, budget_s: float) -> int:
    """Steps that fill ``budget_s`` at the rate a calibration clock measured."""
    rate, first = clock.rate()
    return max(1, round((1 if first else 0) + rate * (budget_s - first)))


# ---------------------------------------------------------------- ours


@dataclasses.dataclass
class Ours:
    """A recipe's pretrain stage: its resolved config, context and image modality (built once)."""

    cfg: object
    ctx: object
    modality: object = None
    vit: object = None  # the encoder's transformers ViTConfig
    encoder_cfg: object = None

    def build(self, accelerator):
        from pipeline.config import ConfigError
        from stages import pretrain

        cfg, ctx = self.cfg, self.ctx
        built = {name: pretrain.objective_config(name, s) for name, s in cfg.objectives.items()}
        needed = sorted({m for _, _, ocfg in built.values() for m in ocfg.reads()})
        if "image" not in needed:
            raise ConfigError(f"the stage trains {', '.join(needed)}; the benchmark needs an image encoder")
        torch.manual_seed(ctx.seed)
        mods, learner, loader = pretrain.assemble(cfg, ctx, built, accelerator)
        encoders = learner.encoders
        self.modality, self.vit = mods["image"], encoders["image"].model.config
        self.encoder_cfg = encoders["image"].cfg
        return learner, loader

    def save(self, state: dict, path: Path) -> Path:
        """A snapshot as the encoder directory a pretrain stage writes, pooling the mean of the final states."""
        from pipeline.encoders import saved

        enc = self.modality.encoder(self.encoder_cfg.model_copy(update={"init_from": None, "pooling": "mean"}))
        enc.model.load_state_dict(state)
        return saved.save(enc, self.modality, path)


def run_ours(ours: Ours, marks_s: list[float], steps: int) -> Clock:
    from accelerate import Accelerator

    from pipeline.train.loop import train

    accelerator = Accelerator(cpu=True)
    learner, loader = ours.build(accelerator)
    cfg = ours.cfg.model_copy(update={"steps": steps, "eval_every": None})
    clock = Clock(marks_s, lambda: learner.encoders["image"].model.state_dict())
    with tempfile.TemporaryDirectory() as out:  # a fresh stage directory: nothing to resume from
        try:
            clock.restart()
            train(learner, loader, cfg, Path(out), accelerator, cfg.model_dump(mode="json"), progress=False,
                  probe=clock)
        except BudgetSpent:
            pass
    clock.take(final=True)
    return clock


# ---------------------------------------------------------------- peers


def vit_config(ours: Ours) -> dict:
    """The ViTConfig fields that make a stock ViT the same encoder as ours."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps", "image_size", "patch_size",
            "num_channels", "qkv_bias")
    return {k: getattr(ours.vit, k) for k in keys}


def save_stock(dims: dict, state: dict, path: Path) -> Path:
    """Encoder weights as a stock ``ViTModel`` directory (what ``selfsup evaluate`` reads as a plain ViT)."""
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**dims), add_pooling_layer=False, use_mask_token=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise RuntimeError(f"not a ViT encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(str(path))
    return path


def images(shards: list[str], transform, seed: int):
    """The training shards as a stock webdataset pipeline, endlessly: shards reshuffled every pass,
    a shuffle buffer, PIL decode, then ``transform`` of the image."""
    import webdataset as wds

    return (wds.WebDataset(shards, shardshuffle=len(shards), detshuffle=True, seed=seed, empty_check=False)
            .shuffle(SHUFFLE).decode("pil").to_tuple("png;jpg;jpeg;webp").map(lambda s: transform(s[0])).repeat())


def _as_mode(channels: int):
    mode = "L" if channels == 1 else "RGB"
    return lambda img: img if img.mode == mode else img.convert(mode)


def mae_decoder(ours: Ours) -> dict:
    """The decoder of ours' MAE objective if the stage has one, else the project's MAE default."""
    from pipeline.objectives import mae

    settings = next((o for o in ours.cfg.objectives.values() if o["objective"] == "mae"), None)
    c = mae.Config(**{k: v for k, v in (settings or {}).items() if k in mae.Config.model_fields})
    return {"decoder_hidden_size": c.decoder_width, "decoder_num_hidden_layers": c.decoder_layers,
            "decoder_num_attention_heads": c.decoder_heads, "decoder_intermediate_size": 4 * c.decoder_width}


def run_vitmae(ours: Ours, shards: list[str], batch: int, workers: int, marks_s: list[float], steps: int) -> Clock:
    from torchvision import transforms as T
    from transformers import Trainer, TrainingArguments, ViTImageProcessor, ViTMAEConfig
    from transformers import ViTMAEForPreTraining as ViTMAE
    from transformers.trainer_callback import PrinterCallback, TrainerCallback

    dims = vit_config(ours)
    torch.manual_seed(ours.ctx.seed)
    model = ViTMAE(ViTMAEConfig(**dims, **mae_decoder(ours), mask_ratio=MAE["mask_ratio"],
                                norm_pix_loss=True))
    proc = ViTImageProcessor()  # run_mae.py's default processor: mean and std 0.5
    c = dims["num_channels"]
    transform = T.Compose([T.Lambda(_as_mode(c)),
                           T.RandomResizedCrop(dims["image_size"], scale=MAE["crop_scale"],
                                               interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean=proc.image_mean[:c], std=proc.image_std[:c])])
    data = images(shards, lambda img: {"pixel_values": transform(img)}, ours.ctx.seed)
    clock = Clock(marks_s, lambda: model.vit.state_dict())

    class Timed(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if clock.due(state.global_step):
                clock.take()
            if clock.done:  # else leave it to the Trainer (which stops at max_steps)
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=MAE["base_lr"] * batch / 256, weight_decay=MAE["weight_decay"],
            adam_beta1=MAE["betas"][0], adam_beta2=MAE["betas"][1], lr_scheduler_type="cosine",
            warmup_steps=MAE["warmup"], dataloader_num_workers=workers, remove_unused_columns=False,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
            seed=ours.ctx.seed)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_stack_pixels,
                          callbacks=[Timed()])
        trainer.remove_callback(PrinterCallback)  # its end-of-run summary; the bench prints its own
        clock.restart()
        trainer.train()
    clock.take(final=True)
    return clock


def _stack_pixels(examples: list[dict]) -> dict:
    """run_mae.py's ``collate_fn``."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}


def simclr_transform(dims: dict):
    """lightly's SimCLR views for small grey images: colour jitter at the small-image strength
    lightly recommends (0.5), brightness and contrast only (saturation, hue and random greyscale do
    nothing to a grey image), no Gaussian blur (SimCLR leaves it out at CIFAR's 32 px), normalized
    as the other two methods are (0.5, 0.5)."""
    from lightly.transforms import SimCLRTransform
    from torchvision.transforms import Compose, Lambda

    c = dims["num_channels"]
    views = SimCLRTransform(input_size=dims["image_size"], **SIMCLR_VIEWS, normalize={"mean": [0.5] * c, "std": [0.5] * c})
    return Compose([Lambda(_as_mode(c)), views])


def run_simclr(ours: Ours, shards: list[str], batch: int, workers: int, marks_s: list[float], steps: int,
               lr: float) -> Clock:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from torch.utils.data import DataLoader
    from transformers import ViTConfig, ViTModel, get_cosine_schedule_with_warmup

    dims = vit_config(ours)
    torch.manual_seed(ours.ctx.seed)
    backbone = ViTModel(ViTConfig(**dims), add_pooling_layer=False)
    d = dims["hidden_size"]
    head = SimCLRProjectionHead(d, d, SIMCLR["out_dim"])
    criterion = NTXentLoss(temperature=SIMCLR["temperature"])
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=SIMCLR["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(opt, round(SIMCLR["warmup"] * steps), steps)
    transform = simclr_transform(dims)
    data = images(shards, lambda img: tuple(transform(img)), ours.ctx.seed)

    def embed(x):  # the backbone's output: its mean-pooled last hidden state
        return head(backbone(pixel_values=x).last_hidden_state[:, 1:].mean(1))

    clock = Clock(marks_s, lambda: backbone.state_dict())
    clock.restart()
    for step, (x0, x1) in enumerate(DataLoader(data, batch_size=batch, num_workers=workers), 1):
        loss = criterion(embed(x0), embed(x1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if clock.due(step):
            clock.take()
        if clock.done or step >= steps:
            break
    clock.take(final=True)
    return clock
