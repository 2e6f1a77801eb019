"""Read and write a dataset directory's configs and manifest, atomically (shared by tag and filter).

Layout (docs/architecture.md): ``DIR/{config}/train-0000i-of-0000n.parquet``, ``DIR/magpie_manifest.json``.
Shards are written under temporary names in the same folder and moved into place with ``os.replace``;
an interrupted write never leaves a half-written shard. Columns are typed with ``datasets.Features``
(the ``huggingface`` schema metadata that ``datasets.load_dataset`` reads back).
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
from magpie_hub.layout import MANIFEST, SPLIT, WORK_DIR, shard_name, shard_paths, split_rows

ROWS_PER_SHARD = 100_000  # default shard size for new configs (filter output)


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
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetDirError(f"unreadable shard in {directory}/{config}: {exc}",
                              hint="rebuild the config") from None
    common = [n for n in schemas[0].names if all(n in s.names for s in schemas[1:])]
    if columns is not None:
        common = [n for n in common if n in columns]
    tables = [pq.read_table(p, columns=common) for p in paths]
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


def write_config(directory: Path, data: ConfigData, shard_rows: Sequence[int] | None = None,
                 rows_per_shard: int = ROWS_PER_SHARD) -> list[Path]:
    """Write ``data`` as ``DIR/{config}/train-*.parquet``: every shard to a temp file under
    ``DIR/.magpie/tmp/`` first, then ``os.replace`` them in; stale shards of another count are removed last. ``shard_rows`` (default:
    ``data.shard_rows`` when it sums to the row count, else ``rows_per_shard`` per shard) sets the split."""
    folder = Path(directory) / data.name
    folder.mkdir(parents=True, exist_ok=True)
    n = data.num_rows
    if shard_rows is None:
        shard_rows = data.shard_rows if sum(data.shard_rows) == n and data.shard_rows else None
    if shard_rows is None:
        count = max(1, -(-n // rows_per_shard))
        shard_rows = split_rows(n, count)
    if sum(shard_rows) != n:
        raise ValueError(f"shard sizes {list(shard_rows)} do not add up to {n} rows")
    table = data.table.cast(data.features.arrow_schema)
    count, offset, staged = len(shard_rows), 0, []
    stage = work_dir(directory, "tmp")  # same filesystem; a kill leaves nothing publishable behind
    try:
        for i, rows in enumerate(shard_rows):
            fd, tmp = tempfile.mkstemp(prefix=f"{data.name}.{shard_name(i, count)}.", suffix=".tmp", dir=stage)
            os.close(fd)
            staged.append((Path(tmp), folder / shard_name(i, count)))
            pq.write_table(table.slice(offset, rows), tmp)
            offset += rows
        for tmp, final in staged:
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for empty in (stage, stage.parent):  # leave no empty .magpie/ in a fresh output dir
            try:
                empty.rmdir()
            except OSError:
                break
    keep = {final for _, final in staged}
    for stale in shard_paths(directory, data.name):
        if stale not in keep:
            stale.unlink()
    return [final for _, final in staged]


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
