"""Is a dataset directory whole? Checked before ``tag``, ``filter``, ``card`` and ``publish`` (dry-run too) act.

A build marks its manifest ``complete: false`` when it starts writing and ``complete: true`` only at its
very end (each config entry gets ``complete: true`` when its shards are merged), so a killed or failed build
leaves a directory that says so. :func:`verify_dataset` checks:

- no other process holds the directory's lock (:mod:`magpie_hub.build.lock`);
- the manifest is valid JSON (an object) and not marked incomplete (the whole build, and each config);
- every config of the manifest has shards, and every config on disk is in the manifest;
- each config's shards are exactly ``train-0000i-of-0000n`` for i < n, each readable (parquet footer and
  schema; ``deep=True`` reads every row too, as publish does), all with the required generation columns;
- each config's rows add up to the manifest's count (``filter.rows_out`` for a filter's output).

Directories written before the flag existed (no ``complete`` key) are accepted when every count matches: a
killed old build is then caught by its missing or short configs. A directory without any manifest (a
hand-made dataset) is checked for readable, consistently named shards only.

Every failure is one :class:`DatasetDirError` naming what is wrong and how to finish it (re-run the build).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from magpie_hub.build.lock import check_unlocked
from magpie_hub.errors import DatasetDirError
from magpie_hub.layout import MANIFEST, SHARD_RE, SPLIT, config_names, shard_paths

# every config holds these (SFT and preference configs alike); plain names: the Hub commands import this
# module and must not import `datasets`
REQUIRED_COLUMNS = ("uuid", "instruction", "response")
"""Columns every shard of every config of a magpie-hub dataset holds (the others are optional: older builds,
hand-made subsets)."""


@dataclass
class Verified:
    """What a verified directory holds: rows per config, and every shard with its size in bytes."""

    directory: Path
    rows: dict[str, int] = field(default_factory=dict)
    shards: dict[Path, int] = field(default_factory=dict)
    legacy: bool = False          # built before the ``complete`` flag: accepted on matching counts


def _fix(manifest: dict[str, Any], directory: Path) -> str:
    recipe = manifest.get("recipe_path")
    if recipe:
        return f"finish it by re-running the build: `magpie-hub build {recipe} --out {directory}`, which resumes"
    return "re-run the `magpie-hub build` that wrote it with the same recipe and --out, which resumes"


def read_manifest_strict(directory: Path) -> dict[str, Any] | None:
    """The manifest as a dict; None when there is none; DatasetDirError when it is not a JSON object."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetDirError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]})",
                              hint="restore it, or rebuild the directory with `magpie-hub build`") from None
    if not isinstance(data, dict):
        raise DatasetDirError(f"{path} is not a JSON object", hint="restore it, or rebuild the directory")
    return data


def expected_rows(manifest: dict[str, Any], config: str) -> int | None:
    """Rows the manifest promises for ``config`` (a filter's output: its ``rows_out``); None if unknown."""
    out = (manifest.get("filter") or {}).get("rows_out") if isinstance(manifest.get("filter"), dict) else None
    if isinstance(out, dict) and config in out:
        return int(out[config])
    entry = (manifest.get("configs") or {}).get(config)
    if isinstance(entry, dict) and isinstance(entry.get("rows"), int):
        return int(entry["rows"])
    return None


def _check_shards(directory: Path, config: str, deep: bool, fix: str) -> tuple[int, dict[Path, int], list[str]]:
    paths = shard_paths(directory, config)
    counts = set()
    for index, path in enumerate(paths):
        match = SHARD_RE.match(path.name)
        if not match or int(match.group(1)) != index:
            raise DatasetDirError(f"config {config!r} in {directory}: shard {path.name} is out of sequence "
                                  f"(a shard is missing or misnamed)", hint=fix)
        counts.add(int(match.group(2)))
    if len(counts) != 1 or counts.pop() != len(paths):
        raise DatasetDirError(f"config {config!r} in {directory}: {len(paths)} {SPLIT}-*.parquet files do not make "
                              f"one complete set (a shard is missing)", hint=fix)
    rows, sizes, columns = 0, {}, None
    for path in paths:
        try:
            meta = pq.ParquetFile(path)
            names = meta.schema_arrow.names
            rows += meta.metadata.num_rows
            if deep:
                pq.read_table(path)
            sizes[path] = path.stat().st_size
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise DatasetDirError(f"config {config!r}: shard {path} is unreadable or truncated "
                                  f"({' '.join(str(exc).split())[:120]})", hint=fix) from None
        columns = names if columns is None else [c for c in columns if c in names]
    return rows, sizes, columns or []


def verify_dataset(directory: Path | str, *, action: str, deep: bool = False) -> Verified:
    """Check that ``directory`` is whole before ``action`` ("tag", "card", ...) uses it (see module doc)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetDirError(f"cannot {action} {directory}: the directory does not exist",
                              hint="pass a dataset directory written by `magpie-hub build`")
    check_unlocked(directory, action)      # a build / tag writing it now: name that process, not the symptom
    manifest = read_manifest_strict(directory)
    fix = _fix(manifest or {}, directory)
    configs = config_names(directory)
    result = Verified(directory)
    listed = manifest.get("configs") if manifest else None
    listed = listed if isinstance(listed, dict) else {}
    if manifest is not None and manifest.get("complete") is False:
        done = [c for c, e in listed.items() if isinstance(e, dict) and e.get("complete")]
        raise DatasetDirError(f"cannot {action} {directory}: its build did not finish ({len(done)} config(s) "
                              f"done: {', '.join(done) or 'none'})", hint=fix)
    if not configs:
        raise DatasetDirError(f"cannot {action} {directory}: it holds no config ({{config}}/{SPLIT}-*.parquet)",
                              hint=fix if manifest else "run magpie-hub build first")
    if manifest is not None:
        result.legacy = "complete" not in manifest
        unfinished = [c for c, e in listed.items() if isinstance(e, dict) and e.get("complete") is False]
        missing = [c for c in listed if c not in configs]
        if unfinished or missing:
            name = (unfinished or missing)[0]
            raise DatasetDirError(f"cannot {action} {directory}: config {name!r} of the manifest is "
                                  f"{'unfinished' if unfinished else 'missing (no shards)'}", hint=fix)
        extra = [c for c in configs if c not in listed and expected_rows(manifest, c) is None]
        if extra and listed:
            raise DatasetDirError(f"cannot {action} {directory}: folder {extra[0]!r} holds shards but is not a "
                                  f"config of {MANIFEST}", hint=f"remove it, or {fix}")
    for config in configs:
        rows, sizes, columns = _check_shards(directory, config, deep, fix)
        if manifest is not None:
            lacking = [c for c in REQUIRED_COLUMNS if c not in columns]
            if lacking:
                raise DatasetDirError(f"cannot {action} {directory}: config {config!r} lacks the column(s) "
                                      f"{', '.join(lacking)} (a damaged or foreign shard)", hint=fix)
            want = expected_rows(manifest, config)
            if want is not None and rows != want:
                raise DatasetDirError(f"cannot {action} {directory}: config {config!r} holds {rows} rows but "
                                      f"{MANIFEST} says {want}", hint=fix)
        result.rows[config] = rows
        result.shards.update(sizes)
    return result


def unchanged_since(verified: Verified, files: dict[Path, int]) -> None:
    """Publishing re-checks what it uploads: every verified shard is among ``files`` (path -> size, as
    hashed for the upload) with the size it had when verified. Else the directory changed meanwhile."""
    for path, size in verified.shards.items():
        now = files.get(path)
        if now != size:
            raise DatasetDirError(f"{path} changed while it was being published ({size} bytes verified, "
                                  f"{'gone' if now is None else f'{now} bytes'} now)",
                                  hint="wait for the command writing the directory to finish and re-run publish")
