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
from pipeline.data.paths import inside, member_name
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

        self.root = root

    def __len__(self) -> int:
        return len(self.items)

    def keys(self, field: str | None) -> list:
        return [key for key, _ in self.items] if field is None else [None] * len(self.items)

    def where(self, i: int) -> str:
        return f"{self.root}/{self.items[i][0]}.*"

    def __getitem__(self, i: int) -> dict:
        key, files = self.items[i]
        return {"__key__": key, **{ext: path.read_bytes() for ext, path in files.items()}}


class JsonlSource:
    """One JSON object per line; string values of media fields are paths relative to the file."""

    def __init__(self, path: Path):
        self.path = path
        self.rows, self.lines = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{path}:{n}: not a JSON object (got {type(row).__name__})")
                self.rows.append(row)
                self.lines.append(n)

    def keys(self, field: str | None) -> list:
        return [row.get(field) for row in self.rows] if field else [f"{i:09d}" for i in range(len(self.rows))]

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"{i:09d}", **self.rows[i], "__base__": str(self.path.parent), "__where__": self.where(i)}


class HFSource:
    """A ``datasets.Dataset`` (in memory, or saved with ``save_to_disk``). Image and audio columns are
    read undecoded, so original file bytes go into the shards untouched."""

    def __init__(self, dataset: Any, split: str | None = None):
        import datasets

        self.name = "dataset"
        if isinstance(dataset, (str, Path)):
            self.name = str(dataset)
            dataset = _load_from_disk(Path(dataset))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ConfigError(f"split: {split!r} is not one of {', '.join(dataset)}")
            dataset = dataset[split]
        for name, feature in dataset.features.items():
            if isinstance(feature, (datasets.Image, datasets.Audio)):
                dataset = dataset.cast_column(name, type(feature)(decode=False))
        self.ds = dataset

    def keys(self, field: str | None) -> list:
        if field is None:
            return [f"{i:09d}" for i in range(len(self.ds))]
        if field not in self.ds.column_names:
            raise ConfigError(f"key_field: {field!r} is not a column of {self.name} ({', '.join(self.ds.column_names)})")
        return self.ds[field]

    def where(self, i: int) -> str:
        return f"{self.name} row {i}"

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = {"__key__": f"{i:09d}", **self.ds[i], "__where__": self.where(i)}
        for name, value in row.items():
            if isinstance(value, dict) and "bytes" in value and "path" in value:  # undecoded media
                row[name] = value["bytes"] if value["bytes"] is not None else Path(value["path"])
        return row


def _load_from_disk(path: Path):
    """A dataset saved with ``save_to_disk``, or a one-line error when ``path`` is not one."""
    import datasets

    marks = ("dataset_info.json", "dataset_dict.json", "state.json")
    if not path.is_dir() or not any((path / m).is_file() for m in marks):
        raise ConfigError(f"{path}: not a saved datasets directory (no {', '.join(marks)}; "
                          "write it with Dataset.save_to_disk, or choose another format)")
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot load the saved dataset ({type(e).__name__}: {e})") from None


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

    def keys(self, field: str | None) -> list:
        if field is not None:
            return [None] * len(self)
        return [s["__key__"] for shard in self.shards for s in iter_samples(shard.path, exts=())]

    def where(self, i: int) -> str:
        shard = max(j for j, s in enumerate(self.starts[:-1]) if s <= i)
        return f"{self.shards[shard].path} sample {i - self.starts[shard]}"

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
    from pipeline.data.remote import is_url

    if is_url(str(path)):  # only shards are read from a URL (s3://, https://, pipe:)
        if kind not in ("auto", "shards"):
            raise ConfigError(f"format: {kind!r} inputs must be local; a URL input must be shards")
        return ShardSource(str(path))
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
    """Item → shard sample (every value bytes). Picklable, so writer processes can share it.

    Media paths of a jsonl row are relative to the jsonl's folder and may not leave it unless
    ``allow_outside``; every problem of an item is a ``ConfigError`` naming where it came from
    (``path:line`` of a jsonl row) and the field."""

    def __init__(self, fields: dict[str, str] | None, modality_cfgs: dict | None = None, key_field: str | None = None,
                 prefix: str = "", allow_outside: bool = False):
        self.fields = fields or {}
        self.cfgs = modality_cfgs or {}
        self.key_field, self.prefix, self.allow_outside = key_field, prefix, allow_outside
        self._mods: dict[str, Any] = {}

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

    def key(self, raw: Any, where: str) -> str:
        """The shard key of an item whose key field (or position) holds ``raw``."""
        if raw is None:
            raise ConfigError(f"{where}: no key field {self.key_field!r}" if self.key_field else
                              f"{where}: item has no key; set key_field to a unique column")
        return f"{self.prefix}{raw}".replace(".", "_")

    def __call__(self, item: dict) -> dict:
        where = item.get("__where__", "item")
        sample = {"__key__": self.key(item.get(self.key_field or "__key__"), where)}
        for field, value in item.items():
            target = None if field.startswith("__") or field == self.key_field else self.target(field)
            if target is None or value is None:
                continue
            try:
                ext, data = self._encode(target, value, item.get("__base__"), f"{where}: field {field!r}")
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(f"{where}: field {field!r}: {e}") from None
            member_name(sample["__key__"], ext, where)
            sample[ext] = data
        return sample

    def _encode(self, target: str, value: Any, base: str | None, where: str) -> tuple[str, bytes]:
        if target in registry.names("modality"):
            if isinstance(value, str) and base and target != "text":
                value = Path(base) / value if self.allow_outside else inside(base, value, where)
                if not value.is_file():
                    raise ConfigError(f"{where}: {value}: no such file")
            return self._modality(target).encode(value)
        if target == "cls":
            return "cls", str(_label(value, where)).encode()
        if target == "json":
            return "json", (value if isinstance(value, bytes) else json.dumps(value).encode())
        return target, value if isinstance(value, bytes) else str(value).encode()


def _label(value: Any, where: str) -> int:
    """An integer label from an int, an integral float, or its text."""
    try:
        number = int(value.decode() if isinstance(value, bytes) else value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"{where}: label {value!r} is not an integer") from None
    return number


def unique(source, encoder: SampleEncoder, duplicates: str = "raise", log=None):
    """``source`` itself when every item's shard key is unique; otherwise a one-line error naming
    the key and where its items are (``duplicates: raise``), or the source without the repeats,
    logged and counted (``duplicates: skip``; the first item of each key is kept)."""
    first: dict[str, int] = {}
    repeats: dict[str, list[int]] = defaultdict(list)
    for i, raw in enumerate(source.keys(encoder.key_field)):
        key = encoder.key(raw, source.where(i))
        if key in first:
            repeats[key].append(i)
        else:
            first[key] = i
    if not repeats:
        return source
    key, rest = next(iter(repeats.items()))
    if duplicates == "raise":
        more = f" ({len(repeats) - 1} more keys repeat)" if len(repeats) > 1 else ""
        places = ", ".join(source.where(i) for i in [first[key], *rest][:4])
        raise ConfigError(f"key {key!r} is used by {len(rest) + 1} items: {places}{more}; keys must be unique "
                          "(set key_field to a unique column, or duplicates: skip)")
    drop = {i for idx in repeats.values() for i in idx}
    if log is not None:
        log.warning("skipped %d items whose key repeats an earlier one (first: %r at %s)", len(drop), key,
                    source.where(rest[0]))
    return Subset(source, [i for i in range(len(source)) if i not in drop], len(drop))


class Subset:
    """Some items of a source, in order; ``skipped`` counts the others."""

    def __init__(self, source, index: list[int], skipped: int):
        self.source, self.index, self.skipped = source, index, skipped

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.index[i]]
