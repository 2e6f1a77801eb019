"""The one shard writer: a config's rows -> ``DIR/{config}/train-0000i-of-0000n.parquet``, atomically.

Every stage that writes rows (build merge, tag in place, filter output) comes here, so there is one size
policy and one way to replace a config. Shards are written into a staging folder under
``DIR/.magpie/tmp/`` (same filesystem), which then replaces ``DIR/{config}`` by renames: a reader sees the
old shards or the new ones, never a mix or half a file; a kill leaves nothing publishable behind.
Files carry the ``huggingface`` features metadata that ``datasets.load_dataset`` reads back.

Size policy: ``shard_count(rows, bytes)`` = enough shards that none holds more than ``MAX_SHARD_BYTES``
of row data (at least one, never more shards than rows).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import datasets as hf_datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features

from magpie_hub.dataset.directory import ConfigData
from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.layout import WORK_DIR, shard_name, split_rows

MAX_SHARD_BYTES = 256 * 1024 * 1024   # of row data; parquet shards come out well under this


def shard_count(rows: int, total_bytes: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    return max(1, min(rows, math.ceil(total_bytes / max_shard_bytes))) if rows else 1


def _replace_config(out: Path, config: str, write: Callable[[Path], None]) -> list[Path]:
    """Run ``write(staging_folder)``, then swap the staging folder in as ``out/config``."""
    out = Path(out)
    tmp_root = Path(out, WORK_DIR, "tmp")
    tmp_root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = tmp_root / f"{config}-{token}"
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        final = out / config
        trash = tmp_root / f"old-{config}-{token}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return sorted(final.glob("*.parquet"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for empty in (tmp_root, tmp_root.parent):  # leave no empty .magpie/ in a fresh output dir
            try:
                empty.rmdir()
            except OSError:
                break


def write_config_shards(out: Path, config: str, rows: Iterable[dict], n_rows: int, *, shards: int = 1,
                        features: Features = GENERATION_FEATURES) -> list[Path]:
    """Write ``n_rows`` rows (an iterable of dicts, in final order, streamed shard by shard) as ``shards``
    files into ``out/config``."""

    def write(folder: Path) -> None:
        it: Iterator[dict] = iter(rows)
        for i, count in enumerate(split_rows(n_rows, shards)):
            chunk = list(islice(it, count))
            if len(chunk) != count:
                raise RuntimeError(f"write_config_shards: expected {n_rows} rows for {config}, got fewer")
            Dataset.from_list(chunk, features=features).to_parquet(str(folder / shard_name(i, shards)))
        if next(it, None) is not None:
            raise RuntimeError(f"write_config_shards: more than {n_rows} rows for {config}")

    bars = not hf_datasets.are_progress_bars_disabled()
    hf_datasets.disable_progress_bars()          # the build shows its own progress
    try:
        return _replace_config(out, config, write)
    finally:
        if bars:
            hf_datasets.enable_progress_bars()


def write_config(directory: Path, data: ConfigData, shard_rows: Sequence[int] | None = None) -> list[Path]:
    """Write an in-memory config (tag, filter) as ``DIR/{config}/train-*.parquet``. ``shard_rows`` (default:
    ``data.shard_rows`` when it sums to the row count, i.e. the same shards as before; else the size policy)
    sets the split."""
    n = data.num_rows
    if shard_rows is None:
        shard_rows = data.shard_rows if sum(data.shard_rows) == n and data.shard_rows else None
    if shard_rows is None:
        shard_rows = split_rows(n, shard_count(n, data.table.nbytes))
    if sum(shard_rows) != n:
        raise ValueError(f"shard sizes {list(shard_rows)} do not add up to {n} rows")
    table: pa.Table = data.table.cast(data.features.arrow_schema)

    def write(folder: Path) -> None:
        offset = 0
        for i, rows in enumerate(shard_rows):
            pq.write_table(table.slice(offset, rows), folder / shard_name(i, len(shard_rows)))
            offset += rows

    return _replace_config(directory, data.name, write)
