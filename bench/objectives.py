"""Training-step throughput of our objectives against the field's implementations at the same dims.

    python bench/objectives.py [--objectives mae mlm clip data2vec] [--size tiny] [--batch-size N]
                               [--steps 3] [--warmup 2] [--repeats 5] [--threads 1]
                               [--device cpu|cuda] [--dtype fp32|bf16] [--peak-tflops T] [--profile NAME]

One training step is forward + backward + AdamW step (+ the EMA teacher update for data2vec), on
one fixed synthetic batch (random pixels, random token ids: the same tensors for both sides).
Pairs, at the same widths, depths, heads, MLP, patch grid, vocabulary and sequence length:

- ``mae``: ours (``pipeline/objectives/mae.py`` on the image ``ViTEncoder``) vs transformers
  ``ViTMAEForPreTraining`` (mask ratio 0.75, norm_pix_loss, decoder width/depth/heads as ours);
- ``mlm``: ours (``mlm.py`` on the text ``BertEncoder``) vs ``BertForMaskedLM`` with
  ``DataCollatorForLanguageModeling.torch_mask_tokens`` masking (special-token mask precomputed
  vectorised, as a tokenizer's ``return_special_tokens_mask`` would hand it over);
- ``clip``: ours (``clip.py`` on image + text encoders, ``pooling: cls``) vs ``open_clip.CLIP``
  built from a config dict + ``open_clip.loss.ClipLoss``; both pool one token per tower (open_clip:
  the ViT's class token and the text's end token);
- ``data2vec-image`` / ``data2vec-text``: ours (``data2vec.py``) vs a student/teacher pair of
  ``Data2VecVisionModel`` / ``Data2VecTextModel``: EMA teacher, targets = mean of the top-K
  instance-normed layers at masked positions, linear regression head, EMA update after the step.

The peers live in ``bench/peers.py``. Our side is assembled as ``stages/pretrain.py`` does it
(modality → encoder, objective, ``Learner``, AdamW over ``trainer.param_groups``); the peer's
optimizer is the same AdamW over the same grouping. Both sides live in one process with the same torch thread count; repetitions are
interleaved (ours, peer, ours, peer …) so that machine noise hits both, and the table gives the
median samples/s over repetitions and ours/peer.

``--device cuda --dtype bf16`` runs both sides on the GPU under bf16 autocast (fp32 weights and
optimizer state), timing with ``torch.cuda.synchronize``. A second table gives each side's FLOPs per
sample as torch's ``FlopCounterMode`` counts one of its steps (matrix products and attention, as
run: work a side skips is not credited to it), the rate it reaches and its MFU against
``--peak-tflops`` (on a GPU with bf16, by default the data sheet's dense bf16 peak). ViT-B/16 MAE
and CLIP B/16 MFU on an H100:

    python bench/objectives.py --device cuda --dtype bf16 --size base --objectives mae clip

``--profile NAME`` prints the top ops of a few steps of each side of one pair instead of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flops import step_flops, utilization
from peers import EMA, Side, clip_text, mae_settings, peer

from modalities.image import ImageConfig
from modalities.text import TextConfig
from pipeline import registry
from pipeline.encoders.base import EncoderConfig
from pipeline.train.learner import Learner

#: benchmark dims per size: encoder width/depth/heads (MLP 4×), image side and patch, text length
#: and vocabulary, batch, MAE decoder (width, depth, heads). ``tiny`` runs on two CPU cores in a few
#: minutes; the others are for a GPU: ``base`` is ViT-B/16 with MAE's 512-wide, 8-deep decoder,
#: BERT-base for MLM and data2vec-text, and CLIP B/16 (its text tower in ``clip_text``).
SIZES = {
    "tiny": {"width": 192, "layers": 4, "heads": 3, "image": 32, "patch": 4, "seq": 64, "vocab": 8000, "batch": 64,
             "decoder": (128, 2, 4)},
    "small": {"width": 384, "layers": 12, "heads": 6, "image": 224, "patch": 16, "seq": 128, "vocab": 30522,
              "batch": 128, "decoder": (512, 8, 16)},
    "base": {"width": 768, "layers": 12, "heads": 12, "image": 224, "patch": 16, "seq": 128, "vocab": 30522,
             "batch": 128, "decoder": (512, 8, 16),
             "clip_text": {"width": 512, "heads": 8, "seq": 77, "vocab": 49408}},
}
OBJECTIVES = ("mae", "mlm", "clip", "data2vec-image", "data2vec-text")


# ---------------------------------------------------------------- inputs


def build_tokenizer(vocab: int, out: Path) -> str:
    """A WordPiece vocabulary of ``vocab`` made-up tokens in BERT's layout, saved where
    AutoTokenizer loads it: the models only need its size and special ids, not a trained one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(str(out))
    return str(out)


def make_inputs(dims: dict, tokenizer) -> dict:
    """Synthetic batch shared by both sides: image [B, 3, S, S] ~ N(0, 1) (normalized pixels);
    text [B, L] = [CLS] random ordinary ids [SEP], no padding (open_clip's text tower takes no
    attention mask, so full rows keep the work identical)."""
    g = torch.Generator().manual_seed(0)
    b, s, n = dims["batch"], dims["image"], dims["seq"]
    first = len(tokenizer.all_special_ids)  # ordinary tokens come after the specials
    ids = torch.randint(first, dims["vocab"], (b, n), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"image": torch.randn(b, 3, s, s, generator=g),
            "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "__key__": [f"sample{i:06d}" for i in range(b)], "__source__": "synthetic"}


def text_dims(name: str, dims: dict) -> dict:
    """The dims the pair's text side runs at: a CLIP pair's text tower may differ from the rest."""
    return clip_text(dims) if name == "clip" else dims


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


# ---------------------------------------------------------------- ours


def encoder_config(dims: dict, pooling: str = "mean") -> EncoderConfig:
    return EncoderConfig(hidden_size=dims["width"], num_layers=dims["layers"], num_heads=dims["heads"],
                         patch_size=dims["patch"], pooling=pooling)


#: CLIP towers pool one token each, as open_clip's do ([CLS] of the ViT, one token of the text)
POOLING = {"clip": "cls"}


def ours(name: str, dims: dict, tok_dir: str, batch: dict, steps_total: int) -> Side:
    """Modality → encoder → objective → Learner, as ``stages/pretrain.py`` ``run`` builds them."""
    kind, settings = {
        "mae": ("mae", {"modality": "image", **mae_settings(dims)}),
        "mlm": ("mlm", {"modality": "text"}),
        "clip": ("clip", {"modalities": ["image", "text"]}),
        "data2vec-image": ("data2vec", {"modality": "image", "ema_start": EMA, "ema_end": EMA}),
        "data2vec-text": ("data2vec", {"modality": "text", "ema_start": EMA, "ema_end": EMA}),
    }[name]
    tdims = text_dims(name, dims)
    cfgs = {"image": ImageConfig(size=dims["image"], channels=3),
            "text": TextConfig(tokenizer=tok_dir, max_length=tdims["seq"])}
    needed = settings.get("modalities") or [settings["modality"]]
    pooling = POOLING.get(name, "mean")
    enc_cfgs = {"image": encoder_config(dims, pooling), "text": encoder_config(tdims, pooling)}
    encoders = {m: registry.modality(m)(cfgs[m]).encoder(enc_cfgs[m]) for m in needed}
    module = registry.module("objective", kind)
    obj = module.Objective(module.Config(**settings), encoders, kind, seed=0)
    learner = Learner(encoders, {kind: obj})

    def loss(step: int) -> torch.Tensor:
        b = {k: batch[k] for k in (*needed, "__key__", "__source__")}
        b["__step__"] = step
        learner.begin_step([b])  # what the trainer calls; a no-op with one micro-batch
        return learner(b)["loss"]

    return Side(learner, loss, lambda step: learner.after_step(step, steps_total))


# ---------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(side: Side, first: int, steps: int, batch_size: int, device: str, autocast) -> tuple[float, float]:
    """(samples per second, samples per CPU-second of this process) over ``steps`` training steps
    numbered from ``first``. On a shared machine the second is steadier: time spent waiting for a
    core another process holds is not counted."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(first, first + steps):
        side.step(s, autocast)
    sync(device)
    n = steps * batch_size
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def compare(name: str, dims: dict, batch: dict, tok_dir: str, tokenizer, args, autocast) -> dict:
    total = args.warmup + args.repeats * args.steps
    torch.manual_seed(0)
    runs = {"ours": ours(name, dims, tok_dir, batch, total).ready(args.device)}
    torch.manual_seed(0)
    runs["peer"] = peer(name, dims, batch, tokenizer).ready(args.device)
    # step 0 is warm-up too, counted: its loss shows both sides start from comparable objectives
    first_loss, flops = {}, {}
    for k, side in runs.items():
        first_loss[k], flops[k] = step_flops(side, 0, autocast)
    for side in runs.values():
        for s in range(1, args.warmup):
            side.step(s, autocast)
    rates, cpu = {"ours": [], "peer": []}, {"ours": [], "peer": []}
    for r in range(args.repeats):  # interleaved: ours, peer, ours, peer …
        first = args.warmup + r * args.steps
        for k in ("ours", "peer"):
            wall, per_cpu = timed(runs[k], first, args.steps, dims["batch"], args.device, autocast)
            rates[k].append(wall)
            cpu[k].append(per_cpu)
    params = {k: sum(p.numel() for p in side.module.parameters() if p.requires_grad) for k, side in runs.items()}
    return {"name": name, "rates": rates, "cpu": cpu, "first_loss": first_loss, "params": params,
            "flops_per_sample": {k: f / dims["batch"] for k, f in flops.items()}}


# ---------------------------------------------------------------- report


def machine(args) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}"
    model = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return (f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{args.dtype}, load average {os.getloadavg()[0]:.2f} before the run")


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def table(results: list[dict], dims: dict, args) -> str:
    rows = [("| objective | ours samples/s (range) | peer samples/s (range) | ours/peer | ours/peer, per CPU-s | "
             "first loss ours / peer | trained params ours / peer |"),
            "|---|---|---|---|---|---|---|"]
    for r in results:
        med = {k: statistics.median(v) for k, v in r["rates"].items()}
        cpu = {k: statistics.median(v) for k, v in r["cpu"].items()}
        span = {k: f"{min(v):.3g}–{max(v):.3g}" for k, v in r["rates"].items()}
        loss, params = r["first_loss"], r["params"]
        rows.append(f"| {r['name']} | {med['ours']:.3g} ({span['ours']}) | {med['peer']:.3g} ({span['peer']}) | "
                    f"**{med['ours'] / med['peer']:.2f}×** | {cpu['ours'] / cpu['peer']:.2f}× | "
                    f"{loss['ours']:.3f} / {loss['peer']:.3f} | {params['ours'] / 1e6:.2f}M / {params['peer'] / 1e6:.2f}M |")
    head = (f"dims: width {dims['width']}, {dims['layers']} layers, {dims['heads']} heads, MLP {4 * dims['width']}, "
            f"image {dims['image']} patch {dims['patch']}, text {dims['seq']} tokens of {dims['vocab']}, "
            f"MAE decoder {'/'.join(map(str, dims['decoder']))} (width/layers/heads), batch {dims['batch']}"
            + (f", CLIP text tower {dims['clip_text']}" if "clip_text" in dims else "")
            + f"; {args.repeats} × {args.steps} timed steps after {args.warmup} warm-up; median over repetitions")
    return "\n".join([head, "", *rows, "", *utilization(results, args)])


def profile(name: str, dims: dict, batch: dict, tok_dir: str, tokenizer, args, autocast) -> None:
    """Top ops by self CPU time over ``--steps`` steps of each side, after warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    total = args.warmup + args.steps
    torch.manual_seed(0)
    runs = {"ours": ours(name, dims, tok_dir, batch, total).ready(args.device)}
    runs["peer"] = peer(name, dims, batch, tokenizer).ready(args.device)
    for k, side in runs.items():
        for s in range(args.warmup):
            side.step(s, autocast)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for s in range(args.warmup, total):
                side.step(s, autocast)
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n=== {name}: {k}\n{prof.key_averages().table(sort_by=sort, row_limit=25)}")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=["mae", "mlm", "clip", "data2vec"],
                    help=f"any of {', '.join(OBJECTIVES)}; data2vec means both of its modalities")
    ap.add_argument("--size", choices=SIZES, default="tiny", help="benchmark dims (see SIZES)")
    ap.add_argument("--batch-size", type=int, help="override the size's batch")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the first repetition")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (ours, peer) per objective")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, both sides (1: on a shared machine, threads that wait on each other "
                         "at every op measure the neighbours more than the code)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    ap.add_argument("--profile", choices=OBJECTIVES, help="profile this pair instead of timing all")
    ap.add_argument("--peak-tflops", type=float,
                    help="peak of the device for the MFU column (default: the GPU's dense bf16 figure with "
                         "--dtype bf16; none on CPU, where 2.45 GHz × 32 fp32 FLOP/cycle = 0.078 per AVX2 core)")
    args = ap.parse_args(argv)
    names = [n for o in args.objectives for n in (("data2vec-image", "data2vec-text") if o == "data2vec" else (o,))]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        ap.error(f"unknown objective {', '.join(unknown)}; pick from {', '.join(OBJECTIVES)} or data2vec")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    args.names = names
    return args


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    dims = dict(SIZES[args.size])
    if args.batch_size:
        dims["batch"] = args.batch_size
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def autocast():
        return torch.autocast(args.device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        texts: dict[tuple[int, int], tuple] = {}

        def pair_inputs(name: str) -> tuple[dict, str, object]:
            """(batch, tokenizer directory, tokenizer) at the dims of the pair's text side."""
            t = text_dims(name, dims)
            key = (t["vocab"], t["seq"])
            if key not in texts:
                tok_dir = build_tokenizer(t["vocab"], Path(tmp) / f"tokenizer-{t['vocab']}")
                tokenizer = AutoTokenizer.from_pretrained(tok_dir)
                texts[key] = (to_device(make_inputs({**dims, **t}, tokenizer), args.device), tok_dir, tokenizer)
            return texts[key]

        if args.profile:
            profile(args.profile, dims, *pair_inputs(args.profile), args, autocast)
            return
        print(machine(args), flush=True)
        results = []
        for name in args.names:
            t0 = time.perf_counter()
            results.append(compare(name, dims, *pair_inputs(name), args, autocast))
            r = results[-1]["rates"]
            print(f"{name}: ours {statistics.median(r['ours']):.0f}, peer {statistics.median(r['peer']):.0f} "
                  f"samples/s ({time.perf_counter() - t0:.0f}s)", flush=True)
        print()
        print(table(results, dims, args))


if __name__ == "__main__":
    main()
