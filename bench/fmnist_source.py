"""Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist``) → a saved Hugging Face dataset,
the input ``selfsup shard`` reads with ``--format hf`` (auto-detected by its ``dataset_info.json``).

    python bench/fmnist_source.py [--split train] [--out /tmp/fmnist-hf]

Columns: ``image`` (``datasets.Image``, each 28x28 grayscale image stored as PNG bytes) and ``label``
(``ClassLabel``, an int 0-9). ``selfsup shard`` copies the PNG bytes into the shards untouched.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain): big-endian header ``0 0 dtype ndim``, ndim int32 sizes, then data."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(x) for x in np.frombuffer(raw, ">i4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: holds {data.size} bytes, the header promises {shape}")
    return data.reshape(shape)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=sorted(PREFIX), default="train")
    p.add_argument("--idx-dir", type=Path, default=IDX_DIR, help="folder of the *-idx?-ubyte.gz files")
    p.add_argument("--out", type=Path, default=Path("/tmp/fmnist-hf"), help="folder for save_to_disk")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    args = p.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    images = read_idx(args.idx_dir / f"{PREFIX[args.split]}-images-idx3-ubyte.gz")[: args.limit]
    labels = read_idx(args.idx_dir / f"{PREFIX[args.split]}-labels-idx1-ubyte.gz")[: args.limit]
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise SystemExit(f"unexpected IDX shapes: images {images.shape}, labels {labels.shape}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(im), "path": None} for im in images], "label": labels.tolist()},
        features=features,
    )
    ds.save_to_disk(str(args.out))
    print(f"{args.out}: {len(ds)} samples (image: PNG 28x28 L, label: 0-9) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
