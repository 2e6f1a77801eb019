"""``magpie-hub filter DIR --preset pro|air|FILE --out DIR2``: apply a filter recipe config by config.

The output keeps the input's layout (``{config}/train-0000i-of-0000n.parquet`` with the same Arrow
schema, so the ``datasets`` features survive), a copy of the manifest with a ``filter`` section (the
recipe, rows in/out and rows removed by each rule per config) and a fresh card. The input directory is
only read. Everything is written to a temporary sibling of ``out`` and moved into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from magpie_hub.build.lock import dataset_lock, pid_alive
from magpie_hub.dataset.directory import (
    ConfigData,
    atomic_write_text,
    read_config,
    read_manifest,
)
from magpie_hub.dataset.schema import BUILD_FEATURES
from magpie_hub.dataset.shards import write_config
from magpie_hub.dataset.verify import verify_dataset
from magpie_hub.errors import DatasetDirError, RecipeError, os_error
from magpie_hub.filters.base import RuleOutcome, how_to_get
from magpie_hub.filters.presets import FilterSpec, load_filter_spec
from magpie_hub.layout import MANIFEST, SPLIT, STAGING_RE, config_names, output_lock_path, staging_prefix
from magpie_hub.tags import step_for


@dataclass
class FilterReport:
    spec: FilterSpec
    rows_in: dict[str, int] = field(default_factory=dict)
    rows_out: dict[str, int] = field(default_factory=dict)
    outcomes: list[dict[str, RuleOutcome]] = field(default_factory=list)  # one {config: outcome} per rule
    out: Path | None = None

    def to_dict(self) -> dict:
        return {
            **self.spec.to_dict(),
            "rows_in": dict(self.rows_in),
            "rows_out": dict(self.rows_out),
            "steps": [
                {**rule.to_dict(),
                 "removed": {c: o.removed for c, o in per.items()},
                 "removed_null": {c: o.removed_null for c, o in per.items()}}
                for rule, per in zip(self.spec.rules, self.outcomes, strict=True)
            ],
        }


def _check_columns(spec: FilterSpec, tables: dict[str, pa.Table]) -> None:
    for rule in spec.rules:
        for column in rule.columns:
            missing = [c for c, t in tables.items() if column not in t.column_names]
            if missing:
                raise DatasetDirError(f"filter rule '{rule.describe()}' needs column {column!r}, missing in "
                                      f"config {missing[0]!r}; {how_to_get(column)}")


def check_producible(spec: FilterSpec, tag_columns: list[str]) -> None:
    """Before a build: every column the recipe's ``filters:`` use is written by the build or by one of the
    recipe's ``tags:`` steps (``tag_columns``); else one line naming the step to add."""
    available = set(BUILD_FEATURES) | set(tag_columns)
    for rule in spec.rules:
        for column in rule.columns:
            if column not in available:
                raise RecipeError(f"filters: rule '{rule.describe()}' needs column {column!r}, which neither the "
                                  f"build nor the recipe's tags: write",
                                  hint=f"add the tag step {step_for(column)!r} to tags:" if step_for(column)
                                  else "use a column the dataset will have")


def apply_spec(spec: FilterSpec, tables: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], FilterReport]:
    """Apply the rules in order to every config; return the filtered tables and the report."""
    _check_columns(spec, tables)
    report = FilterReport(spec=spec, rows_in={c: t.num_rows for c, t in tables.items()})
    current = dict(tables)
    for rule in spec.rules:
        per: dict[str, RuleOutcome] = {}
        for config, table in current.items():
            mask, nulls = rule.keep_mask(table)
            kept = table.filter(mask)
            per[config] = RuleOutcome(rows_in=table.num_rows, removed=table.num_rows - kept.num_rows,
                                      removed_null=nulls)
            current[config] = kept
        report.outcomes.append(per)
    report.rows_out = {c: t.num_rows for c, t in current.items()}
    return current, report


def print_report(report: FilterReport, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    configs = list(report.rows_in)
    table = Table(title=f"filter {report.spec.name}: rows removed per rule")
    table.add_column("#", justify="right")
    table.add_column("rule")
    for c in configs:
        table.add_column(c, justify="right")
    table.add_row("", "rows in", *[str(report.rows_in[c]) for c in configs])
    for i, (rule, per) in enumerate(zip(report.spec.rules, report.outcomes, strict=True), 1):
        cells = []
        for c in configs:
            o = per[c]
            cells.append(f"-{o.removed}" + (f" ({o.removed_null} null)" if o.removed_null else ""))
        table.add_row(str(i), rule.describe(), *cells)
    table.add_row("", "rows out", *[str(report.rows_out[c]) for c in configs])
    console.print(table)


def _prepare_out(directory: Path, out: Path) -> None:
    if out.resolve() == directory.resolve():
        raise DatasetDirError("--out must be a new directory, not the input (the input is never modified)")
    if directory.resolve() in out.resolve().parents:
        raise DatasetDirError("--out must not be inside the input directory; choose a sibling path")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and "filter" not in read_manifest(out))):
        raise DatasetDirError(f"{out} exists and is not an earlier filter output; choose another --out or "
                              "remove it")


def filter_dataset(directory: Path | str, preset: str | Path | FilterSpec, out: Path | str, *,
                   console: Console | None = None, finish: Callable[[Path], None] | None = None) -> FilterReport:
    """Filter every config of ``directory`` with ``preset`` (name, YAML path or parsed spec) into ``out``.

    ``finish(staged_dir)`` (the pipeline renders the card there) runs on the complete output before it
    replaces ``out`` in one rename."""
    directory, out = Path(directory), Path(out)
    console = console or Console(stderr=True)
    if not directory.is_dir():
        raise DatasetDirError(f"dataset directory {directory} not found; pass a directory made by "
                              "`magpie-hub build`")
    spec = load_filter_spec(preset)
    verify_dataset(directory, action="filter")       # whole, and no writer holds it (the input is only read)
    try:
        with dataset_lock(out, "filter", path=output_lock_path(out)):   # one filter per --out
            return _filter_locked(directory, spec, out, console, finish)
    except OSError as exc:
        raise os_error(exc, f"cannot filter {directory} into {out}") from None


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the hidden staging copies of ``out`` left by a killed filter (their pid is gone)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(f".{out.name}.*-*"):
        match = STAGING_RE.match(path.name)
        if not match or match.group("name") != out.name:
            continue
        pid = int(match.group("pid")) if match.group("pid") else None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _filter_locked(directory: Path, spec: FilterSpec, out: Path, console: Console,
                   finish: Callable[[Path], None] | None) -> FilterReport:
    configs = config_names(directory)
    if not configs:
        raise DatasetDirError(f"{directory} has no config with {SPLIT}-*.parquet shards; build it first")
    _prepare_out(directory, out)
    manifest = read_manifest(directory)
    data = {c: read_config(directory, c) for c in configs}
    filtered, report = apply_spec(spec, {c: d.table for c, d in data.items()})

    out.parent.mkdir(parents=True, exist_ok=True)
    for left in remove_leftovers(out):
        console.print(f"removed {left}, left behind by a filter that was stopped")
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
    try:
        for config, table in filtered.items():
            write_config(tmp, ConfigData(config, table, [], data[config].features))
        manifest["filter"] = {**report.to_dict(), "input": str(directory)}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if finish is not None:
            finish(tmp)
        old = None
        if out.exists():
            old = out.parent / staging_prefix(out, "old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out = out
    print_report(report, console)
    empty = [c for c, n in report.rows_out.items() if n == 0]
    if empty:
        console.print(f"[yellow]warning:[/] the filter left no rows in {', '.join(empty)} "
                      f"(written as empty shards); loosen the rules if that is not intended")
    console.print(f"wrote {out} ({sum(report.rows_out.values())} of {sum(report.rows_in.values())} rows kept)")
    return report
