"""Read a dataset directory's configs; read/update its manifest; atomic file writes (temp file + rename).

Layout names: :mod:`magpie_hub.layout`. Shards are written by :mod:`magpie_hub.dataset.shards` (the one
writer). Columns are typed with ``datasets.Features`` (the ``huggingface`` schema metadata that
``datasets.load_dataset`` reads back).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from magpie_hub.errors import DatasetDirError
from magpie_hub.layout import MANIFEST, SPLIT, WORK_DIR, shard_paths


@dataclass
class ConfigData:
    """One config loaded in memory: its rows (in shard order), the rows per shard, and typed features."""

    name: str
    table: pa.Table
    shard_rows: list[int]
    features: Features

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def read_config(directory: Path, config: str, columns: Sequence[str] | None = None) -> ConfigData:
    """Concatenate a config's shards. A column missing from some shard (an interrupted rewrite) is dropped."""
    paths = shard_paths(directory, config)
    if not paths:
        raise DatasetDirError(f"config {config!r} has no {SPLIT}-*.parquet shards in {directory}",
                              hint="build it first with `magpie-hub build`")
    try:
        schemas = [pq.read_schema(p) for p in paths]
        common = [n for n in schemas[0].names if all(n in s.names for s in schemas[1:])]
        if columns is not None:
            common = [n for n in common if n in columns]
        tables = [pq.read_table(p, columns=common) for p in paths]
    except (OSError, pa.ArrowException) as exc:
        raise DatasetDirError(f"unreadable shard in {directory}/{config}: {' '.join(str(exc).split())[:200]}",
                              hint="rebuild the config with `magpie-hub build`") from None
    features = _features_of(schemas[0], common)
    tables = [t.cast(features.arrow_schema) for t in tables]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return ConfigData(config, table.combine_chunks(), [t.num_rows for t in tables], features)


def _features_of(schema: pa.Schema, names: Sequence[str]) -> Features:
    full = Features.from_arrow_schema(schema)
    return Features({n: full[n] for n in names})


def with_columns(data: ConfigData, columns: dict[str, list], features: Features) -> ConfigData:
    """A copy of ``data`` with ``columns`` (typed by ``features``) added or replaced, row order kept."""
    table, feats = data.table, dict(data.features)
    for name, values in columns.items():
        if len(values) != table.num_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {table.num_rows} rows")
        arr = pa.array(values, type=Features({name: features[name]}).arrow_schema.field(name).type)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
        feats[name] = features[name]
    feats = Features({n: feats[n] for n in table.column_names})
    return ConfigData(data.name, table, list(data.shard_rows), feats)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it becomes ``path`` (mode 0644) in one rename,
    on failure it is removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files must be readable
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetDirError(f"{path} is not valid JSON ({exc})", hint="rebuild or fix the manifest") from None
    return data if isinstance(data, dict) else {}


def update_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read-modify-write ``magpie_manifest.json`` atomically; returns the new manifest."""
    data = read_manifest(directory)
    change(data)
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def work_dir(directory: Path, *parts: str) -> Path:
    """``DIR/.magpie/<parts>`` (local state, never published), created."""
    path = Path(directory, WORK_DIR, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
