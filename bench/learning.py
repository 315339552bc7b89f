"""Time to accuracy: Fashion-MNIST linear-probe accuracy against minutes of pretraining on this CPU,
for a pretrain stage of one of our recipes and two stock peers on the same encoder and the same images.

    python bench/learning.py [--recipe recipes/learn.yaml] [--stage joint_image] [--minutes 1 2 4 8]
                             [--probe-train 2000] [--probe-test 2000] [--threads N] [--calibrate S]
                             [--methods ours vitmae simclr] [--out /tmp/learning-bench]

Methods, one after another in this process, with the same torch thread count:

- ``ours``: the stage exactly as the recipe defines it (objectives, encoder, modality, loader,
  optimizer, health, accumulation), assembled as ``stages/pretrain.py`` does it and trained by
  ``pipeline.train.loop.train``; only ``steps`` is set here (and the online kNN probe of
  ``eval_every`` is not run);
- ``vitmae``: transformers ``ViTMAEForPreTraining`` under the stock ``Trainer``, as the
  transformers image-pretraining example (``run_mae.py``) trains it: RandomResizedCrop(scale
  0.2–1.0, bicubic) + RandomHorizontalFlip + Normalize(0.5, 0.5), mask ratio 0.75, norm_pix_loss,
  AdamW betas (0.9, 0.95), lr 1.5e-4 × batch / 256, weight decay 0.05, cosine with 5 % warmup
  (Trainer defaults otherwise: gradient clipping at 1.0, no decay on biases and norms). Its decoder
  is ours' MAE decoder when the stage trains MAE, else the project's MAE default;
- ``simclr``: lightly's ``SimCLRTransform`` (grey-image settings: ``learners.simclr_transform``),
  ``SimCLRProjectionHead(D, D, 128)`` and ``NTXentLoss(temperature=0.5)`` on a stock ``ViTModel``
  whose mean-pooled last hidden state is the backbone output; AdamW lr ``--simclr-lr`` (1e-3),
  weight decay 0.05, cosine with 5 % warmup.

Both peers are the same encoder as ours (width, depth, heads, MLP, patch, image size, channels,
LayerNorm eps), take the same batch per step as ours (``loader.batch_size`` × ``accumulate``) and
as many loader workers, and read the same training shards (the stage's sources) through webdataset
with their own transforms. Each method trains once, for the largest budget: a short calibration
run (``--calibrate`` seconds, default a quarter of the largest budget, at most 30) measures its
steps per second and sizes its lr schedule so the run ends at that budget; if it runs slower the
run stops there all the same. Its encoder is snapshotted at every mark of training time (the
snapshot's own time is off the clock) and at random init (minute 0).

The probe is the same for every snapshot and is ``selfsup evaluate``'s: the snapshot is written as
an encoder directory (ours as a pretrain stage writes it, the peers as a stock ``ViTModel``), then
``pipeline.evaluation.embed`` gives the mean-pooled final hidden states of ``--probe-train`` samples
of the training split and ``--probe-test`` of the test split (rows as ``max_train`` / ``max_test``
pick them; both are rounded up to whole batches of the evaluate batch size), unaugmented, and
``pipeline.evaluators.linear_probe`` fits standardized logistic regression, C picked on a
validation split of the training rows. The linear-probe settings and batch size are the recipe's
evaluate stage's when it has one, else Cs [0.1, 1.0], max_iter 200 (the starter's).

Prints the accuracy table, ours minus the best peer at each budget and the minutes ours needs to
reach the best peer's accuracy at the largest budget (or the best random-init accuracy, if
higher), interpolated between snapshots. Writes ``learning.json`` and ``learning.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import learners
from learners import MAE, SIMCLR, Ours, planned_steps, run_ours, run_simclr, run_vitmae, save_stock, vit_config

from pipeline.config import ConfigError
from pipeline.data.shards import open_shards
from pipeline.runner import load_recipe, stage_config
from pipeline.stage import Context

METHODS = ("ours", "vitmae", "simclr")
LABELS = {"ours": "ours", "vitmae": "transformers ViTMAE", "simclr": "lightly SimCLR"}


def load_stage(recipe_path: str, stage: str, runs: str):
    """(pretrain config, context, evaluate config or None) of ``stage`` in the recipe."""
    recipe, modalities = load_recipe(recipe_path)
    names = [e["name"] for e in recipe.stages]
    if stage not in names:
        raise ConfigError(f"{recipe_path}: no stage {stage!r} (stages: {', '.join(names)})")
    entries = {e["name"]: e for e in recipe.stages}
    kind, cfg = stage_config(entries[stage], recipe_path)
    if kind.name != "pretrain":
        raise ConfigError(f"{recipe_path}: stage {stage} is of kind {kind.name}, not pretrain")
    ctx = Context.of_recipe(recipe, modalities, recipe_path, Path(runs) / recipe.name, Path(tempfile.gettempdir()),
                            progress=False)
    evaluate = next((stage_config(e, recipe_path)[1] for e in recipe.stages if e.get("stage", e["name"]) == "evaluate"),
                    None)
    return cfg, ctx, evaluate


def probe_settings(evaluate, cs: list[float] | None):
    from pipeline.evaluators import linear_probe

    given = dict(evaluate.evaluators.get("linear_probe", {})) if evaluate is not None else {"Cs": [0.1, 1.0],
                                                                                           "max_iter": 200}
    if cs:
        given["Cs"] = cs
    return linear_probe.Config(**given), evaluate.batch_size if evaluate is not None else 256


def probe(encoders: Path, args, lp, batch_size: int) -> dict:
    """``selfsup evaluate``'s linear probe of one encoder directory."""
    from threadpoolctl import threadpool_limits

    from pipeline.evaluation.embed import embed
    from pipeline.evaluators import linear_probe

    kw = {"modalities": ["image"], "batch_size": batch_size, "progress": False}
    train = embed(encoders, args.probe_train_data, limit=args.probe_train, **kw).features["image"]
    test = embed(encoders, args.probe_test_data, limit=args.probe_test, **kw).features["image"]
    with threadpool_limits(limits=1, user_api="blas"):  # as the evaluate stage fits its probes
        m = linear_probe.evaluate(lp, train, test)[0]
    return {"accuracy": m.value, "interval": list(m.interval) if m.interval else None, "C": m.extra["C"],
            "n_train": len(train), "n_test": len(test), "chance": m.chance}


def probe_all(name: str, clock, ours: Ours, args, lp, batch_size: int) -> list[dict]:
    rows = []
    points = [{"mark_s": 0.0, "train_s": 0.0, "step": 0, "state": clock.initial, "short": False}, *clock.snapshots]
    with tempfile.TemporaryDirectory() as tmp:
        for i, snap in enumerate(points):
            path = Path(tmp) / f"{name}-{i}"
            if name == "ours":
                ours.save(snap["state"], path)
            else:
                save_stock(vit_config(ours), snap["state"], path)
            t0 = time.perf_counter()
            rows.append({**{k: v for k, v in snap.items() if k != "state"}, **probe(path, args, lp, batch_size),
                         "probe_s": round(time.perf_counter() - t0, 2)})
            print(f"  {name}: minute {snap['mark_s'] / 60:g} (trained {snap['train_s']:.1f} s, step {snap['step']}): "
                  f"accuracy {rows[-1]['accuracy']:.4f} (C {rows[-1]['C']:g}, probe {rows[-1]['probe_s']:.1f} s)",
                  flush=True)
    return rows


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    """Minutes at which the (minutes, accuracy) curve first reaches ``target``, linearly interpolated."""
    if points[0][1] >= target:
        return points[0][0]
    for (t0, a0), (t1, a1) in itertools.pairwise(points):
        if a1 >= target:
            return t0 + (t1 - t0) * (target - a0) / (a1 - a0)
    return None


def compare(results: dict, minutes: list[float]) -> dict:
    """Ours minus the best peer at each budget, and ours' time to the target accuracy."""
    peers = [m for m in results if m != "ours"]
    acc = {m: [r["accuracy"] for r in results[m]["probes"]] for m in results}  # [init, mark 1, ...]
    out: dict = {"gap": None, "target": None, "time_to_target_min": None}
    if "ours" not in results or not peers:
        return out
    out["gap"] = {str(t): acc["ours"][i + 1] - max(acc[p][i + 1] for p in peers) for i, t in enumerate(minutes)}
    best_peer = max(peers, key=lambda p: acc[p][-1])
    best_init = max(results, key=lambda m: acc[m][0])
    target, source = acc[best_peer][-1], f"{best_peer} at {minutes[-1]:g} min"
    if acc[best_init][0] > target:
        target, source = acc[best_init][0], f"{best_init} at random init"
    curve = [(r["train_s"] / 60, r["accuracy"]) for r in results["ours"]["probes"]]
    out.update(target=target, target_of=source, time_to_target_min=time_to(curve, target))
    return out


def _flag(snap: dict) -> str:
    if snap["short"]:
        return "*"
    return "†" if snap["train_s"] > 1.05 * snap["mark_s"] else ""


def report(results: dict, minutes: list[float], cmp: dict) -> None:
    methods = list(results)
    peers = [m for m in methods if m != "ours"]
    print()
    print("| minutes | " + " | ".join(LABELS[m] for m in methods) + (" | ours − best peer |" if cmp["gap"] else " |"))
    print("|---" * (len(methods) + 1 + bool(cmp["gap"])) + "|")
    for i, t in enumerate([0.0, *minutes]):
        cells = [f"{results[m]['probes'][i]['accuracy']:.4f}" + _flag(results[m]["probes"][i]) for m in methods]
        gap = ""
        if cmp["gap"]:
            g = (results["ours"]["probes"][0]["accuracy"] - max(results[p]["probes"][0]["accuracy"] for p in peers)
                 if i == 0 else cmp["gap"][str(t)])
            gap = f" {g * 100:+.2f} pts |"
        print(f"| {'0 (init)' if i == 0 else f'{t:g}'} | " + " | ".join(cells) + " |" + gap)
    flags = {_flag(r) for m in methods for r in results[m]["probes"]}
    if "*" in flags:
        print("* the run finished its planned steps before this mark: the snapshot is its final weights")
    if "†" in flags:
        print("† taken over 5 % past its mark (the step that crossed it was long): see the plot for its true time")
    print()
    print("| method | steps | samples/s | batch | peak lr | calibrated steps/s |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        r = results[m]
        print(f"| {LABELS[m]} | {r['steps_done']} of {r['steps_planned']} | {r['samples_per_s']:.0f} | {r['batch']} | "
              f"{r['lr']:.3g} | {r['calibrated_steps_per_s']:.3f} |")
    if cmp["target"] is not None:
        t = cmp["time_to_target_min"]
        print()
        print(f"target: {cmp['target']:.4f} ({cmp['target_of']}); ours reaches it "
              + (f"after {t:.2f} min of pretraining ({t / minutes[-1]:.2f}× the largest budget)" if t is not None
                 else f"not within {minutes[-1]:g} min: not reached"))


def plot(results: dict, minutes: list[float], cmp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, r in results.items():
        ax.plot([p["train_s"] / 60 for p in r["probes"]], [p["accuracy"] for p in r["probes"]], marker="o",
                label=LABELS[m])
    if cmp["target"] is not None:
        ax.axhline(cmp["target"], color="grey", linestyle="--", linewidth=0.8, label=f"target ({cmp['target_of']})")
    ax.set_xlabel("pretraining minutes (wall clock, this CPU)")
    ax.set_ylabel("Fashion-MNIST linear-probe accuracy")
    ax.set_xticks([0.0, *minutes])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_method(name: str, ours: Ours, args, shards: list[str], batch: int, workers: int, marks_s: list[float],
               steps: int):
    if name == "ours":
        return run_ours(ours, marks_s, steps)
    if name == "vitmae":
        return run_vitmae(ours, shards, batch, workers, marks_s, steps)
    return run_simclr(ours, shards, batch, workers, marks_s, steps, args.simclr_lr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "recipes/learn.yaml"))
    p.add_argument("--stage", default="joint_image", help="a pretrain stage of the recipe that trains an image encoder")
    p.add_argument("--runs", default="runs", help="where the recipe's run directory is ({run} in the stage's paths)")
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 4, 8], help="probe after these minutes")
    p.add_argument("--probe-train", type=int, default=2000, help="training-split samples the probe fits on")
    p.add_argument("--probe-test", type=int, default=2000, help="test-split samples the probe is scored on")
    p.add_argument("--probe-train-data", default=str(ROOT / "data/starter/fmnist/train"))
    p.add_argument("--probe-test-data", default=str(ROOT / "data/starter/fmnist/test"))
    p.add_argument("--cs", type=float, nargs="+", default=None, help="the probe's C grid (default: see above)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, every method (default: all cores)")
    p.add_argument("--calibrate", type=float, default=None, help="seconds of each method's throughput calibration")
    p.add_argument("--simclr-lr", type=float, default=SIMCLR["lr"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default="/tmp/learning-bench")
    args = p.parse_args(argv)
    if min(args.minutes) <= 0:
        p.error("--minutes: budgets are positive (minute 0, the random init, is always probed)")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weights loaded and saved at every probe
    torch.set_num_threads(args.threads)
    minutes = sorted(args.minutes)
    marks_s = [60 * t for t in minutes]
    budget = marks_s[-1]
    calibrate = args.calibrate if args.calibrate is not None else min(30.0, budget / 4)
    cfg, ctx, evaluate = load_stage(args.recipe, args.stage, args.runs)
    lp, probe_batch = probe_settings(evaluate, args.cs)
    ours = Ours(cfg, ctx)
    from accelerate import Accelerator

    ours.build(Accelerator(cpu=True))  # the encoder's settings, which the peers copy
    shards = [s.path for n in cfg.sources for s in open_shards(ctx.source(n).shards, ctx.base_dir).shards]
    batch, workers = cfg.loader.batch_size * cfg.accumulate, cfg.loader.num_workers
    dims = vit_config(ours)
    side = dims["image_size"] if isinstance(dims["image_size"], int) else dims["image_size"][0]
    print(f"{args.recipe} stage {args.stage}: {', '.join(cfg.objectives)} on {', '.join(cfg.sources)} "
          f"({len(shards)} shards); encoder {dims['hidden_size']} wide, {dims['num_hidden_layers']} layers, "
          f"{dims['num_attention_heads']} heads, patch {dims['patch_size']}, {side} px, "
          f"{dims['num_channels']} channel(s); batch {batch}, {workers} loader workers, {args.threads} torch threads")
    print(f"marks {', '.join(f'{t:g}' for t in minutes)} min; calibration {calibrate:g} s per method; probe "
          f"{args.probe_train} train / {args.probe_test} test samples, Cs {lp.Cs}, max_iter {lp.max_iter}")
    if ours.encoder_cfg.init_from:
        print(f"note: ours starts from {ours.encoder_cfg.init_from}: its minute 0 is those weights, not a random init")
    if cfg.eval_every is not None:
        print("note: the stage's online kNN probe (eval_every) is not run; the bench's clock holds the probe hook")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"recipe": args.recipe, "stage": args.stage, "stage_config": cfg.model_dump(mode="json"),
            "encoder": dims, "batch": batch, "workers": workers, "threads": args.threads, "minutes": minutes,
            "calibrate_s": calibrate, "probe": {"train": args.probe_train, "test": args.probe_test, **lp.model_dump()},
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count()},
            "peers": {"vitmae": {**MAE, "lr": MAE["base_lr"] * batch / 256, "decoder": learners.mae_decoder(ours)},
                      "simclr": {**SIMCLR, "lr": args.simclr_lr, "views": learners.SIMCLR_VIEWS}}}
    results: dict = {}
    t_start = time.perf_counter()
    for name in args.methods:
        print(f"\n{LABELS[name]}: calibrating for {calibrate:g} s", flush=True)
        cal = run_method(name, ours, args, shards, batch, workers, [calibrate], 10 ** 6)
        steps = planned_steps(cal, budget)
        rate, first = cal.rate()
        load = os.getloadavg()[0]
        print(f"{LABELS[name]}: {rate:.3f} steps/s after {first:.1f} s to the first step; training {steps} steps "
              f"for {budget / 60:g} min (load average before: {load:.2f})", flush=True)
        clock = run_method(name, ours, args, shards, batch, workers, marks_s, steps)
        done = clock.times[-1] if clock.times else (0, 1e-9)
        lr = {"ours": cfg.optim.lr, "vitmae": MAE["base_lr"] * batch / 256, "simclr": args.simclr_lr}[name]
        results[name] = {"steps_planned": steps, "steps_done": done[0], "train_s": done[1],
                         "samples_per_s": done[0] * batch / max(done[1], 1e-9), "batch": batch, "lr": lr,
                         "calibrated_steps_per_s": rate, "calibration_first_step_s": first, "load_before": load,
                         "probes": probe_all(name, clock, ours, args, lp, probe_batch)}
        (out / "learning.json").write_text(json.dumps({**info, "results": results}, indent=1))
    cmp = compare(results, minutes)
    report(results, minutes, cmp)
    (out / "learning.json").write_text(json.dumps({**info, "results": results, "comparison": cmp}, indent=1))
    plot(results, minutes, cmp, out / "learning.png")
    print(f"\n{out / 'learning.json'}, {out / 'learning.png'}; {time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        sys.exit(f"learning.py: error: {e}")

