"""Build time, memory and query latency of the retrieval index, exact search against faiss.

    python bench/retrieval.py [--sizes 100000 1000000] [--dim 256] [--batches 1 64] [--repeats 30]
                              [--threads N] [--k 10] [--dir /tmp/retrieval-bench]

For each size N: N random unit vectors of width ``--dim`` are written as an index
(``pipeline.retrieval.index.write``: build = normalizing + writing the safetensors matrix and its
keys); ``Index(..., backend="exact")`` then searches the memory-mapped matrix, and
``backend="faiss"`` an ``IndexFlatIP`` it builds from that matrix on first use (its build time is
reported apart). Queries are fresh random unit vectors, in batches of 1 and 64; each timing is one
``Index.search`` call, repeated ``--repeats`` times after one warm-up (the matrix is in the page
cache by then, as it is for a long-lived retrieval process). Both backends' top-k rows are compared
on the same queries. RSS is this process's resident set after each backend's searches (ru_maxrss
peak too); the memory map counts in RSS only for the pages it touched.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timings(index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """(p50 ms, p99 ms, the rows found) of ``repeats`` searches of ``queries``."""
    hits = index.search(queries, "image", k)  # warm-up: page cache, faiss build, BLAS threads
    ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, "image", k)
        ms.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), hits.rows


def bench_size(n: int, args, rng: np.random.Generator) -> list[dict]:
    from pipeline.retrieval.index import Index, write

    out = Path(args.dir) / f"n{n}"
    shutil.rmtree(out, ignore_errors=True)
    x = unit(rng, n, args.dim)
    keys = [f"s{i:08d}" for i in range(n)]
    where = [("shard-000000.tar", i) for i in range(n)]
    t0 = time.perf_counter()
    write(out, {"image": x}, {"image": keys}, {"image": where}, {"encoders": "-", "data": []})
    build_s = time.perf_counter() - t0
    del x
    rows = []
    found = {}
    for backend in ("exact", "faiss"):
        index = Index(out, backend=backend)
        t0 = time.perf_counter()
        extra = 0.0
        if backend == "faiss":
            index.search(unit(rng, 1, args.dim), "image", args.k)  # builds the IndexFlatIP
            extra = time.perf_counter() - t0
        for b in args.batches:
            q = unit(np.random.default_rng(b), b, args.dim)
            p50, p99, hits = timings(index, q, args.k, args.repeats)
            found[(backend, b)] = hits
            rows.append({"n": n, "backend": backend, "batch": b, "build_s": build_s + extra, "p50": p50, "p99": p99,
                         "rss": rss_mb(), "peak": peak_mb()})
        del index
    for b in args.batches:
        same = bool((found[("exact", b)] == found[("faiss", b)]).all())
        for r in rows:
            if r["batch"] == b:
                r["same"] = same
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="BLAS / faiss threads (default: all cores)")
    p.add_argument("--dir", default="/tmp/retrieval-bench")
    args = p.parse_args()
    if args.threads:
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print("| N | backend | queries | build s | p50 ms | p99 ms | RSS MB | peak RSS MB | same top-k |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for r in bench_size(n, args, rng):
            print(f"| {r['n']:,} | {r['backend']} | {r['batch']} | {r['build_s']:.2f} | {r['p50']:.1f} | "
                  f"{r['p99']:.1f} | {r['rss']:.0f} | {r['peak']:.0f} | {'yes' if r['same'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
