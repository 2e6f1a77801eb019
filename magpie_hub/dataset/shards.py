"""Write a config's rows as Hub-layout parquet shards, atomically.

Rows are written shard by shard (bounded memory) with ``datasets`` (``Dataset.from_list(rows,
features=GENERATION_FEATURES).to_parquet``, so the files carry the ``huggingface`` features metadata that
``load_dataset`` reads back) into a temporary folder under ``DIR/.magpie/``, which then replaces
``DIR/{config}`` by renames: a reader sees the old shards or the new ones, never a mix or half a file.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import datasets as hf_datasets
from datasets import Dataset, Features

from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.layout import WORK_DIR, shard_name, split_rows

MAX_SHARD_BYTES = 256 * 1024 * 1024   # of JSON row text; parquet shards come out well under this


def shard_count(rows: int, total_bytes: int, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    return max(1, min(rows, math.ceil(total_bytes / max_shard_bytes))) if rows else 1


def write_config_shards(out: Path, config: str, rows: Iterable[dict], n_rows: int, *, shards: int = 1,
                        features: Features = GENERATION_FEATURES) -> list[Path]:
    """Write ``n_rows`` rows (an iterable, in final order) as ``shards`` files into ``out/config``."""
    out = Path(out)
    tmp_root = Path(out, WORK_DIR, "tmp")
    tmp_root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = tmp_root / f"{config}-{token}"
    tmp.mkdir()
    bars = not hf_datasets.are_progress_bars_disabled()
    hf_datasets.disable_progress_bars()          # the build shows its own progress
    try:
        it: Iterator[dict] = iter(rows)
        for i, count in enumerate(split_rows(n_rows, shards)):
            chunk = list(islice(it, count))
            if len(chunk) != count:
                raise RuntimeError(f"write_config_shards: expected {n_rows} rows for {config}, got fewer")
            Dataset.from_list(chunk, features=features).to_parquet(str(tmp / shard_name(i, shards)))
        if next(it, None) is not None:
            raise RuntimeError(f"write_config_shards: more than {n_rows} rows for {config}")
        final = out / config
        trash = tmp_root / f"old-{config}-{token}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return sorted(final.glob("*.parquet"))
    finally:
        if bars:
            hf_datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
