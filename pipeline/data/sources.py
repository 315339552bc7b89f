"""Raw inputs the shard stage turns into shards: a folder of files, a jsonl manifest, a Hugging Face
``datasets`` dataset, or existing shards. Each is an indexable sequence of *items*, dicts mapping
a field to a value; ``SampleEncoder`` maps fields to shard keys and encodes values to bytes through
the modality that owns them.

Field → shard key (``fields`` setting, or inferred): a modality name (``image``, ``text``,
``audio``) is encoded by that modality; ``cls`` must be an integer; ``json`` any JSON value; a
shard extension (``jpg``, ``txt``, …) stores bytes as they are.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.config import ConfigError
from pipeline.data.shards import iter_samples, open_shards

#: column names understood without a ``fields`` mapping
_ALIASES = {"label": "cls", "labels": "cls", "cls": "cls", "caption": "text", "text": "text",
            "image": "image", "img": "image", "audio": "audio", "json": "json", "metadata": "json"}


class FolderSource:
    """Files grouped by stem: ``a.jpg`` + ``a.txt`` + ``a.cls`` is one item (the webdataset /
    img2dataset folder layout); subfolders become part of the key."""

    def __init__(self, root: Path):
        groups: dict[str, dict[str, Path]] = defaultdict(dict)
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(root).as_posix()
                stem, _, ext = rel.rpartition("/")[2].partition(".")
                key = (rel.rpartition("/")[0] + "/" if "/" in rel else "") + stem
                groups[key][ext.lower()] = p
        if not groups:
            raise ConfigError(f"{root}: folder holds no files")
        self.items = sorted(groups.items())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        key, files = self.items[i]
        return {"__key__": key, **{ext: path.read_bytes() for ext, path in files.items()}}


class JsonlSource:
    """One JSON object per line; string values of media fields are paths relative to the file."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    self.rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"{i:09d}", **self.rows[i], "__base__": str(self.path.parent)}


class HFSource:
    """A ``datasets.Dataset`` (in memory, or saved with ``save_to_disk``). Image and audio columns are
    read undecoded, so original file bytes go into the shards untouched."""

    def __init__(self, dataset: Any, split: str | None = None):
        import datasets

        if isinstance(dataset, (str, Path)):
            dataset = datasets.load_from_disk(str(dataset))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ConfigError(f"split: {split!r} is not one of {', '.join(dataset)}")
            dataset = dataset[split]
        for name, feature in dataset.features.items():
            if isinstance(feature, (datasets.Image, datasets.Audio)):
                dataset = dataset.cast_column(name, type(feature)(decode=False))
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = {"__key__": f"{i:09d}", **self.ds[i]}
        for name, value in row.items():
            if isinstance(value, dict) and "bytes" in value and "path" in value:  # undecoded media
                row[name] = value["bytes"] if value["bytes"] is not None else Path(value["path"])
        return row


class ShardSource:
    """Samples of existing shards, for re-sharding. Reads sequentially: the writer asks for
    contiguous ranges, so each chunk opens its first shard once and streams on."""

    def __init__(self, spec: str | Path):
        self.shards = open_shards(spec).shards
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + s.count)
        self._it, self._next = None, -1

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        if i != self._next or self._it is None:
            shard = max(j for j, s in enumerate(self.starts[:-1]) if s <= i)
            self._it = self._chain(shard, i - self.starts[shard])
        self._next = i + 1
        sample = next(self._it)
        return {k: v for k, v in sample.items() if k != "__index__"}

    def _chain(self, shard: int, offset: int):
        for j in range(shard, len(self.shards)):
            yield from iter_samples(self.shards[j].path, offset if j == shard else 0)


def open_source(path: str | Path, kind: str = "auto", split: str | None = None):
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"input: {path}: no such file or folder")
    if kind == "auto":
        if path.suffix == ".jsonl":
            kind = "jsonl"
        elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            kind = "hf"
        elif (path / "manifest.json").is_file() or path.name.endswith((".tar", ".tar.gz")):
            kind = "shards"
        else:
            kind = "folder"
    makers = {"folder": FolderSource, "jsonl": JsonlSource, "shards": ShardSource,
              "hf": lambda p: HFSource(p, split)}
    if kind not in makers:
        raise ConfigError(f"format: {kind!r} is not one of auto, {', '.join(makers)}")
    return makers[kind](path)


class SampleEncoder:
    """Item → shard sample (every value bytes). Picklable, so writer processes can share it."""

    def __init__(self, fields: dict[str, str] | None, modality_cfgs: dict | None = None, key_field: str | None = None,
                 prefix: str = ""):
        self.fields = fields or {}
        self.cfgs = modality_cfgs or {}
        self.key_field, self.prefix = key_field, prefix
        self._mods: dict[str, Any] = {}
        self._count = 0

    def _modality(self, name: str):
        if name not in self._mods:
            self._mods[name] = registry.modality(name)(self.cfgs.get(name))
        return self._mods[name]

    def target(self, field: str) -> str | None:
        """Shard key or modality a field goes to; None drops it (only when ``fields`` says so)."""
        if field in self.fields:
            return self.fields[field] or None
        if self.fields:  # an explicit mapping lists every field to keep
            return None
        return _ALIASES.get(field.lower(), field)

    def __call__(self, item: dict) -> dict:
        key = str(item.get(self.key_field)) if self.key_field else item.get("__key__")
        if key is None:
            raise ConfigError("key_field: items have no key; set key_field to a unique column")
        sample = {"__key__": f"{self.prefix}{key}".replace(".", "_")}
        base = item.get("__base__")
        for field, value in item.items():
            target = None if field.startswith("__") or field == self.key_field else self.target(field)
            if target is None or value is None:
                continue
            if target in registry.names("modality"):
                if isinstance(value, str) and base and target != "text":
                    value = Path(base) / value
                ext, data = self._modality(target).encode(value)
            elif target == "cls":
                ext, data = "cls", str(int(value)).encode()
            elif target == "json":
                ext, data = "json", (value if isinstance(value, bytes) else json.dumps(value).encode())
            else:
                ext, data = target, value if isinstance(value, bytes) else str(value).encode()
            sample[ext] = data
        return sample
