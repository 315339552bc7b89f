"""Throughput of decoded, augmented, collated image batches: ``pipeline.data.StreamingLoader`` against
Hugging Face ``datasets`` streaming over the same webdataset shards, with the same per-sample work.

    python bench/data.py [--shards data/starter/fmnist/train] [--batch-size 256] [--workers 0 2]
                         [--size 28] [--channels 1] [--repeats 3] [--batches N] [--plain-tar]
                         [--remote [--cache]]

Both sides read the same tar files, decode with ``modalities.image`` (``decode``, then ``transform``
with the generator ``pipeline.data.seeding.sample_rng(seed, epoch, "image:<shard file>:<key>")``), collate
with the modality's ``collate`` and return ``{"image": [B, C, H, W] float, "cls": [B] long}``. A
check before timing asserts that both produce identical tensors for the same samples.

Hugging Face side: ``load_dataset("webdataset", data_files=..., streaming=True)`` with the image
column cast to ``Image(decode=False)`` (so the PNG is decoded once, by the same code as ours),
wrapped in ``torch.utils.data.DataLoader`` with the same batch size, workers and prefetch factor;
``datasets.IterableDataset`` hands each worker its own subset of the shards. Decoding, augmenting
and collating happen in the DataLoader's ``collate_fn``, i.e. inside the workers (``--hf-mode map``
does the per-sample work in ``IterableDataset.map`` instead; on Fashion-MNIST it is no faster with
workers and slower without).

Each timed run is a fresh pass from the first batch to the end of the epoch (or ``--batches``),
worker start-up included; ``torch.set_num_threads(1)`` everywhere. Runs are interleaved
(repeat → workers → loader) so that machine noise hits both loaders alike; the table shows the
median over repeats, the range, and samples per CPU-second (main process + reaped workers).

``--remote`` adds our loader over the same shard folder served on loopback by ``tests/servers.py``
(HTTP with ranges) and by moto's S3 server, each in its own process; its CPU time is not counted in
samples per CPU-second but shows in "other load". First it prints how fast each server hands over
the files outside the loader. ``--cache`` adds S3 through ``loader.cache``, cold and warm.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modalities.image import ImageConfig
from modalities.image import Modality as ImageModality
from pipeline.data.loader import LoaderConfig, SourceConfig, StreamingLoader, prepare_sample
from pipeline.data.seeding import sample_rng
from pipeline.data.shards import MANIFEST, iter_samples, open_shards

PREFETCH = LoaderConfig().prefetch_factor


def machine_busy() -> float:
    """CPU-seconds spent by everything on the machine so far (from /proc/stat; 0 where unavailable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = (fields + [0] * 8)[:8]  # user nice system idle iowait irq softirq steal
    return (sum(busy) - busy[3] - busy[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (finished dataloader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# -- ours ---------------------------------------------------------------------------------------


def ours_batches(args, workers: int, spec: str | None = None, cache: Path | None = None):
    loader = StreamingLoader(
        {"bench": SourceConfig(shards=spec or args.shard_spec, modalities=["image"], label=args.label)},
        LoaderConfig(batch_size=args.batch_size, num_workers=workers, epochs=1, augment=True,
                     prefetch_factor=PREFETCH, cache={"dir": str(cache), "max_bytes": 1 << 40} if cache else None),
        {"image": ImageConfig(size=args.size, channels=args.channels)},
        seed=args.seed,
    )
    return iter(loader)


# -- Hugging Face datasets ----------------------------------------------------------------------


def hf_dataset(args):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("webdataset", data_files={"train": args.files}, split="train", streaming=True)
    image_key = next(k for k in ImageModality.extensions if k in ds.features)
    ds = ds.cast_column(image_key, datasets.Image(decode=False))
    return ds, image_key


class HFPrepare:
    """Per-sample work of ``prepare_sample`` on an HF webdataset example (label already an int)."""

    def __init__(self, args, image_key: str):
        self.mod = ImageModality(ImageConfig(size=args.size, channels=args.channels))
        self.seed, self.image_key, self.label = args.seed, image_key, args.label

    def sample(self, ex: dict) -> tuple[torch.Tensor, int]:
        rng = sample_rng(self.seed, 0, f"image:{os.path.basename(ex['__url__'])}:{ex['__key__']}")
        img = self.mod.decode(ex[self.image_key]["bytes"], self.image_key)
        return self.mod.transform(img, rng), int(ex[self.label])

    def __call__(self, examples: list[dict]) -> dict:
        """``collate_fn``: raw examples → batch."""
        images, labels = zip(*map(self.sample, examples))
        return {"image": self.mod.collate(list(images)), "cls": torch.tensor(labels, dtype=torch.long),
                "__key__": [ex["__key__"] for ex in examples]}

    def map_one(self, ex: dict) -> dict:
        image, label = self.sample(ex)
        return {"image": image, "cls": label, "__key__": ex["__key__"]}

    def collate_mapped(self, examples: list[dict]) -> dict:
        return {"image": self.mod.collate([ex["image"] for ex in examples]),
                "cls": torch.tensor([ex["cls"] for ex in examples], dtype=torch.long),
                "__key__": [ex["__key__"] for ex in examples]}


def hf_batches(args, workers: int):
    ds, prep = args.hf_ds, args.hf_prep
    kwargs = {"prefetch_factor": PREFETCH} if workers > 0 else {}
    if args.hf_mode == "map":
        ds = ds.map(prep.map_one, remove_columns=list(ds.features))
        collate = prep.collate_mapped
    else:
        collate = prep
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=workers, collate_fn=collate,
                                         **kwargs)
    return iter(loader)


# -- harness ------------------------------------------------------------------------------------


def check_same(args) -> int:
    """Both paths give identical tensors and labels for the first samples of the first shard."""
    mod = ImageModality(ImageConfig(size=args.size, channels=args.channels))
    src = SourceConfig(shards=args.shard_spec, modalities=["image"], label=args.label)
    path = args.files[0]
    ours = {}
    for sample in iter_samples(path, 0, 64):
        ours[sample["__key__"]] = prepare_sample(sample, src, {"image": mod}, args.seed, 0, path)
    n = 0
    for ex in args.hf_ds:
        if ex["__key__"] not in ours:
            continue
        image, label = args.hf_prep.sample(ex)
        mine = ours.pop(ex["__key__"])
        if not torch.equal(image, mine["image"]) or label != mine["cls"]:
            raise SystemExit(f"mismatch on sample {ex['__key__']}: the two loaders do different work")
        n += 1
        if not ours:
            break
    if ours:
        raise SystemExit(f"{len(ours)} samples of {path} never came out of the HF stream")
    return n


def timed(make, args, workers: int, max_batches: int | None, collect: bool = True) -> dict:
    if collect:
        gc.collect()
    b0, c0, t0 = machine_busy(), cpu_seconds(), time.perf_counter()
    it = make(args, workers)
    n = batches = 0
    first = None
    shape = None
    for batch in it:
        n += len(batch["cls"])
        batches += 1
        if first is None:
            first = time.perf_counter() - t0
            shape = tuple(batch["image"].shape[1:])
        if max_batches and batches >= max_batches:
            break
    wall = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()  # generator: runs the loader's cleanup now
    del it
    if collect:
        gc.collect()  # dataloader workers are joined (and their CPU time reaped) on shutdown
    cpu = cpu_seconds() - c0
    other = max(0.0, machine_busy() - b0 - cpu) / wall  # cores kept busy by other processes (and steal)
    return {"samples": n, "batches": batches, "wall": wall, "cpu": cpu, "first": first, "shape": shape,
            "other": other}


def plain_copies(files: list[str], counts: list[int], tmp: Path) -> list[str]:
    """Decompressed copies of ``.tar.gz`` shards (with a manifest), for reading uncompressed tar."""
    out, entries = [], []
    for f, count in zip(files, counts):
        name = Path(f).name.removesuffix(".gz").removesuffix(".tgz")
        dst = tmp / (name if name.endswith(".tar") else name + ".tar")
        with gzip.open(f, "rb") if f.endswith((".gz", ".tgz")) else open(f, "rb") as src, open(dst, "wb") as w:
            shutil.copyfileobj(src, w, 1 << 20)
        out.append(str(dst))
        entries.append({"path": dst.name, "count": count})
    (tmp / MANIFEST).write_text(json.dumps({"format": "webdataset", "total": sum(counts), "shards": entries}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(ROOT / "data/starter/fmnist/train"),
                   help="shard directory with manifest.json, manifest, brace pattern or glob")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to run")
    p.add_argument("--size", type=int, default=28, help="output image side (ImageConfig.size)")
    p.add_argument("--channels", type=int, default=1, help="ImageConfig.channels")
    p.add_argument("--label", default="cls", help="shard key of the integer label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per loader and worker count")
    p.add_argument("--batches", type=int, default=None, help="stop each run after N batches (default: full epoch)")
    p.add_argument("--warmup", type=int, default=4, help="batches of the untimed warm-up run per configuration")
    p.add_argument("--loaders", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    p.add_argument("--hf-mode", choices=["collate", "map"], default="collate",
                   help="where HF does the per-sample work: DataLoader collate_fn, or IterableDataset.map")
    p.add_argument("--plain-tar", action="store_true",
                   help="decompress the shards to plain .tar in a temp dir first (both loaders read those)")
    p.add_argument("--remote", action="store_true",
                   help="also time ours reading the same shards from a loopback HTTP server and a moto S3 server "
                        "(each in its own process)")
    p.add_argument("--cache", action="store_true",
                   help="with --remote: also time S3 through loader.cache, emptied before each run (cold: every "
                        "shard downloaded and kept) and filled beforehand (warm: read from the copies)")
    p.add_argument("--profile", type=int, metavar="WORKERS", default=None,
                   help="instead of benchmarking, cProfile one epoch of ours with this num_workers (0 profiles everything)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    shardset = open_shards(args.shards)
    args.shard_spec = args.shards
    args.files = [s.path for s in shardset.shards]
    total = shardset.total
    tmp = None
    if args.plain_tar:
        tmp = Path(tempfile.mkdtemp(prefix="bench-tar-"))
        args.files = plain_copies(args.files, [s.count for s in shardset.shards], tmp)
        args.shard_spec = str(tmp)
    servers = []
    try:
        if args.remote:
            servers = serve_remote(args)
            args.loaders = [*args.loaders, "http", "s3"]
            store_speed(args)
            if args.cache:
                tmp = tmp or Path(tempfile.mkdtemp(prefix="bench-cache-"))
                args.cold, args.warm = tmp / "cold", tmp / "warm"
                fill(args.s3_spec, args.warm)
                args.loaders = [*args.loaders, "s3-cold", "s3-warm"]
        if args.profile is not None:
            return profile(args)
        return bench(args, total)
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def serve_remote(args) -> list:
    """Start an HTTP server over the shard folder and a moto S3 server holding a copy of it, each in
    its own process; sets ``args.http_spec`` / ``args.s3_spec`` and the S3 environment (workers inherit it)."""
    import socket
    import subprocess

    folder = Path(args.shard_spec)
    if not (folder / MANIFEST).is_file():
        raise SystemExit("--remote needs a shard folder with a manifest")
    http = subprocess.Popen([sys.executable, str(ROOT / "tests" / "servers.py"), str(folder)],
                            stdout=subprocess.PIPE, text=True)
    args.http_spec = f"{http.stdout.readline().strip()}/{MANIFEST}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import s3fs

    fs = s3fs.S3FileSystem()
    for _ in range(100):
        try:
            fs.mkdir("bench")
            break
        except OSError:
            time.sleep(0.1)
    fs.put(str(folder) + "/", "bench/shards/", recursive=True)
    args.s3_spec = "s3://bench/shards"
    return [http, s3]


def store_speed(args, repeats: int = 3) -> None:
    """How fast each store hands over the shard files, outside the loader: local reads, a plain GET per
    file from each server (fsspec for HTTP, boto3 ``get_object`` for S3), and ``RemoteFile`` read in the
    tar reader's 256 KiB pieces. The best of ``repeats`` passes over every file."""
    import boto3
    import fsspec

    from pipeline.data.remote import RemoteFile

    folder = Path(args.shard_spec)
    names = [Path(f).name for f in args.files]
    total = sum((folder / n).stat().st_size for n in names)
    http_base, client, http = args.http_spec.rsplit("/", 1)[0], boto3.client("s3"), fsspec.filesystem("http")

    def piecewise(url: str) -> None:
        with RemoteFile(url) as f:
            while f.read(1 << 18):
                pass

    ways = {"local disk (open().read())": lambda n: (folder / n).read_bytes(),
            "HTTP, one GET per file (fsspec cat_file)": lambda n: http.cat_file(f"{http_base}/{n}"),
            "HTTP, RemoteFile": lambda n: piecewise(f"{http_base}/{n}"),
            "S3, one GET per file (boto3 get_object)":
                lambda n: client.get_object(Bucket="bench", Key=f"shards/{n}")["Body"].read(),
            "S3, RemoteFile (s3fs)": lambda n: piecewise(f"{args.s3_spec}/{n}")}
    print(f"store speed, {len(names)} files, {total / 1e6:.1f} MB, best of {repeats}:")
    for label, read in ways.items():
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for n in names:
                read(n)
            best = min(best, time.perf_counter() - t)
        print(f"  {label}: {total / best / 1e6:.0f} MB/s ({best * 1000 / len(names):.1f} ms per file)")


def fill(spec: str, folder: Path) -> None:
    """Every shard of ``spec`` read once through a ``ShardCache`` in ``folder``, which keeps them."""
    from pipeline.data.cache import ShardCache

    cache = ShardCache(folder, 1 << 40)
    for shard in open_shards(spec).shards:
        for _ in iter_samples(shard.path, cache=cache, sha256=shard.sha256):
            pass
    if cache.kept != len(open_shards(spec).shards):
        raise SystemExit(f"{folder}: {cache.kept} shards kept, expected all")


def profile(args) -> int:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = timed(ours_batches, args, args.profile, args.batches, collect=False)
    prof.disable()
    gc.collect()
    print(f"ours, num_workers={args.profile}: {result['samples']} samples in {result['wall']:.2f}s (under cProfile)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    return 0


def bench(args, total: int) -> int:
    import datasets
    import PIL

    def cold(a, w):
        shutil.rmtree(a.cold, ignore_errors=True)
        return ours_batches(a, w, a.s3_spec, a.cold)

    makers = {"ours": ours_batches, "hf": hf_batches,
              "http": lambda a, w: ours_batches(a, w, a.http_spec), "s3": lambda a, w: ours_batches(a, w, a.s3_spec),
              "s3-cold": cold, "s3-warm": lambda a, w: ours_batches(a, w, a.s3_spec, a.warm)}
    if "hf" in args.loaders:
        t = time.perf_counter()
        args.hf_ds, image_key = hf_dataset(args)
        args.hf_prep = HFPrepare(args, image_key)
        print(f"HF load_dataset (not timed below): {time.perf_counter() - t:.2f}s, n_shards={args.hf_ds.n_shards}")
        print(f"same-work check: {check_same(args)} samples identical (image tensor and label)")
    expect = min(total, args.batches * args.batch_size) if args.batches else total
    print(f"shards: {len(args.files)} files, {total} samples{' (plain tar copies)' if args.plain_tar else ''}; "
          f"batch {args.batch_size}; timing {expect} samples per run, {args.repeats} runs each; "
          f"torch {torch.__version__}, datasets {datasets.__version__}, Pillow {PIL.__version__}, "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs")
    for w in args.workers:
        for name in args.loaders:
            timed(makers[name], args, w, args.warmup)
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.repeats):
        for w in args.workers:
            for name in args.loaders:
                res = timed(makers[name], args, w, args.batches)
                if res["samples"] != expect:
                    raise SystemExit(f"{name} with {w} workers yielded {res['samples']} samples, expected {expect}")
                runs.setdefault((name, w), []).append(res)
                print(f"  run {r + 1}: {name:4s} workers={w}  {res['samples'] / res['wall']:8.0f} samples/s  "
                      f"({res['wall']:.2f}s, first batch {res['first']:.2f}s, shape {res['shape']}, "
                      f"other load {res['other']:.2f} cores)", flush=True)

    def rate(name, w):
        return statistics.median(x["samples"] / x["wall"] for x in runs[(name, w)])

    print()
    print("| loader | workers | samples/s (median) | range | samples per CPU-s | first batch s | other load |")
    print("|---|---|---|---|---|---|---|")
    for w in args.workers:
        for name in args.loaders:
            xs = runs[(name, w)]
            rates = [x["samples"] / x["wall"] for x in xs]
            cpu = statistics.median(x["samples"] / x["cpu"] for x in xs)
            first = statistics.median(x["first"] for x in xs)
            other = max(x["other"] for x in xs)
            label = {"ours": "ours (StreamingLoader)", "http": "ours over HTTP (loopback server)",
                     "s3": "ours over S3 (moto server)", "s3-cold": "ours over S3, loader.cache cold (filling)",
                     "s3-warm": "ours over S3, loader.cache warm"}.get(name, f"HF datasets streaming ({args.hf_mode})")
            print(f"| {label} | {w} | {rate(name, w):.0f} | {min(rates):.0f}–{max(rates):.0f} | {cpu:.0f} | {first:.2f} | {other:.2f} |")
    if max(x["other"] for xs in runs.values() for x in xs) > 0.2:
        print("WARNING: other processes used CPU during some runs ('other load', in cores); wall-clock rates "
              "are lower than on an idle machine")
    if {"ours", "hf"} <= set(args.loaders):
        print()
        print("| workers | ours/HF |")
        print("|---|---|")
        for w in args.workers:
            print(f"| {w} | {rate('ours', w) / rate('hf', w):.2f}× |")
    remote = [n for n in ("http", "s3", "s3-cold", "s3-warm") if n in args.loaders]
    if remote and "ours" in args.loaders:
        names = {"http": "HTTP", "s3": "S3", "s3-cold": "S3 cache cold", "s3-warm": "S3 cache warm"}
        print()
        print("| workers | " + " | ".join(f"{names[n]} / local" for n in remote) + " |")
        print("|---|" + "---|" * len(remote))
        for w in args.workers:
            print(f"| {w} | " + " | ".join(f"{rate(n, w) / rate('ours', w):.2f}×" for n in remote) + " |")
    if "ours" in args.loaders and 0 in args.workers:
        xs = runs[("ours", 0)]
        per_core = rate("ours", 0)
        per_cpu = statistics.median(x["samples"] / x["cpu"] for x in xs)
        print()
        print(f"ours, num_workers=0 (one core, main process): {per_core:.0f} samples/s per core "
              f"({per_cpu:.0f} samples per CPU-second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
