"""An embedding index on disk, and search over it.

An index directory holds, for each modality present in the shards it was built from,
``<modality>.safetensors`` with ``embeddings`` [N, D] float32 (L2-normalized), ``shard`` [N] int32
(position in ``index.json``'s ``shards`` list) and ``position`` [N] int64 (the sample's place in
that shard), so every hit can be shown from its shard; ``keys.json`` maps each modality to its N
sample keys; ``index.json`` says which encoders made the index (``selfsup retrieve`` loads them
itself), from which data, and each matrix's size.

Search is exact by default: one matrix product of the queries with the memory-mapped matrix,
``chunk`` rows at a time, keeping a running top-k, so an index larger than memory streams through
the page cache. ``backend="faiss"`` (the ``retrieval`` extra) copies the matrix into a faiss
``IndexFlatIP`` once and searches there; on the same matrix it returns the same hits.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import ConfigError

VERSION = 1
INFO, KEYS = "index.json", "keys.json"
Backend = Literal["exact", "faiss"]


@dataclass
class Hits:
    """Top-k of a batch of queries: rows [Q, k], best first (k may be less than asked: small index)."""

    scores: np.ndarray  # [Q, k] float32 cosine
    rows: np.ndarray  # [Q, k] int64 row in the modality's matrix


def write(out: str | Path, embeddings: dict[str, np.ndarray], keys: dict[str, list[str]],
          where: dict[str, list[tuple[str, int]]], info: dict) -> Path:
    """Write an index: per modality an [N, D] matrix, its N keys and their (shard, position).
    Rows are normalized here (a zero row stays zero). ``info`` (encoders, data, …) goes into index.json."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = sorted({s for places in where.values() for s, _ in places})
    number = {s: i for i, s in enumerate(shards)}
    meta = {}
    for m, x in embeddings.items():
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) != len(keys[m]) or len(x) != len(where[m]):
            raise ValueError(f"{m}: {x.shape} embeddings for {len(keys[m])} keys and {len(where[m])} places")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        save_file({"embeddings": np.ascontiguousarray(x),
                   "shard": np.array([number[s] for s, _ in where[m]], dtype=np.int32),
                   "position": np.array([p for _, p in where[m]], dtype=np.int64)}, str(out / f"{m}.safetensors"))
        meta[m] = {"count": int(x.shape[0]), "dim": int(x.shape[1])}
    (out / KEYS).write_text(json.dumps(keys) + "\n")
    (out / INFO).write_text(json.dumps({"version": VERSION, **info, "shards": shards, "modalities": meta},
                                       indent=1) + "\n")
    return out


def memmap(file: str | Path, name: str) -> np.ndarray:
    """Tensor ``name`` of a safetensors file as a read-only numpy memmap (no copy, nothing read yet).
    The format is an 8-byte header length, a JSON header with each tensor's dtype, shape and byte
    offsets, then the raw little-endian data."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    if name not in header:
        raise ConfigError(f"{file}: no tensor {name!r} (has {', '.join(k for k in header if k != '__metadata__')})")
    entry = header[name]
    dtype = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}[entry["dtype"]]
    start, _ = entry["data_offsets"]
    return np.memmap(file, dtype=dtype, mode="r", offset=8 + n + start, shape=tuple(entry["shape"]))


class Index:
    """A built index opened for search; matrices are memory-mapped on first use."""

    def __init__(self, path: str | Path, backend: Backend = "exact", chunk: int = 131072):
        self.path = Path(path)
        file = self.path / INFO
        if not file.is_file():
            raise ConfigError(f"{self.path}: not an index (no {INFO}); build one with `selfsup index`")
        self.info = json.loads(file.read_text())
        if self.info.get("version") != VERSION:
            raise ConfigError(f"{file}: version {self.info.get('version')!r} is not one this pipeline reads ({VERSION})")
        if backend not in ("exact", "faiss"):
            raise ConfigError(f"backend {backend!r}: choose exact or faiss")
        self.backend, self.chunk = backend, chunk
        self._keys: dict | None = None
        self._faiss: dict = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.info["modalities"])

    def check(self, modality: str) -> None:
        if modality not in self.info["modalities"]:
            raise ConfigError(f"{self.path}: no {modality} in this index (it holds {', '.join(self.modalities)})")

    def matrix(self, modality: str) -> np.ndarray:
        self.check(modality)
        return memmap(self.path / f"{modality}.safetensors", "embeddings")

    def keys(self, modality: str) -> list[str]:
        self.check(modality)
        if self._keys is None:
            self._keys = json.loads((self.path / KEYS).read_text())
        return self._keys[modality]

    def place(self, modality: str, row: int) -> tuple[str, int]:
        """(shard path, position in the shard) of a row."""
        file = self.path / f"{modality}.safetensors"
        return self.info["shards"][int(memmap(file, "shard")[row])], int(memmap(file, "position")[row])

    def search(self, queries: np.ndarray, modality: str, k: int) -> Hits:
        """Top-``k`` rows of ``modality`` by inner product with each query (cosine for unit queries)."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        matrix = self.matrix(modality)
        if q.shape[1] != matrix.shape[1]:
            raise ConfigError(f"{self.path}: queries of width {q.shape[1]}, the {modality} matrix has {matrix.shape[1]}")
        if self.backend == "faiss":
            return self._faiss_search(q, modality, matrix, k)
        return exact_search(q, matrix, k, self.chunk)

    def _faiss_search(self, q: np.ndarray, modality: str, matrix: np.ndarray, k: int) -> Hits:
        if modality not in self._faiss:
            self._faiss[modality] = faiss_index(matrix)
        k = min(k, len(matrix))
        scores, rows = self._faiss[modality].search(q, k)
        return Hits(scores.astype(np.float32), rows.astype(np.int64))


def exact_search(q: np.ndarray, matrix: np.ndarray, k: int, chunk: int = 131072) -> Hits:
    """q: [Q, D], matrix: [N, D] (array or memmap) → top-k by inner product; equal scores are
    listed by row."""
    import torch

    n = len(matrix)
    k = min(k, n)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, n, chunk):
        s = torch.from_numpy(q @ np.asarray(matrix[start : start + chunk]).T)  # [Q, C]
        top_s, top_r = s.topk(min(k, s.shape[1]), dim=1)  # torch's top-k: ~2x numpy's argpartition here
        best_s = np.concatenate([best_s, top_s.numpy()], axis=1)
        best_r = np.concatenate([best_r, top_r.numpy() + start], axis=1)
        if best_s.shape[1] > k:
            keep = _top(best_s, best_r, k)
            best_s, best_r = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_r, keep, 1)
    order = _top(best_s, best_r, k)
    return Hits(np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1))


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Column order of the k best per row: highest score first, the lower row first on a tie."""
    order = np.lexsort((rows, -scores), axis=1)
    return order[:, :k]


def faiss_index(matrix: np.ndarray):
    """An exact inner-product faiss index holding ``matrix`` (copied into faiss's memory)."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("backend faiss: faiss is not installed (pip install 'selfsup[retrieval]')") from None
    index = faiss.IndexFlatIP(matrix.shape[1])
    for start in range(0, len(matrix), 262144):
        index.add(np.ascontiguousarray(matrix[start : start + 262144], dtype=np.float32))
    return index
