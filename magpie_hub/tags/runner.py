"""Run tag steps over a dataset directory in place: resumable, idempotent, atomic.

``tag_dataset(DIR, steps)``: loads every config, skips steps whose columns are already present in every
config, runs the rest (checkpointing each finished chunk / global result under ``DIR/.magpie/tags/``,
so a ``kill -9`` resumes at the step and config it was in), then rewrites each changed config's shards
(same count, names and row order; temp file + ``os.replace``) and records the ``tags`` section of
``magpie_manifest.json``. Re-running never duplicates rows or columns. Statistics and the card are the
pipeline's business (:mod:`magpie_hub.pipeline`): the result says whether the data changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from magpie_hub.build.lock import dataset_lock
from magpie_hub.dataset.directory import (
    ConfigData,
    read_config,
    read_manifest,
    update_manifest,
    with_columns,
    write_parquet_atomic,
)
from magpie_hub.dataset.shards import write_config
from magpie_hub.dataset.verify import verify_dataset
from magpie_hub.errors import DatasetDirError, MagpieError, RecipeError, os_error
from magpie_hub.layout import config_names
from magpie_hub.tags import DEFAULT_STEPS, step_class
from magpie_hub.tags.base import TagContext, TagStep, work_dir

REQUIRED_COLUMNS = ("uuid", "instruction", "response", "conversations")
StepSpec = str | Mapping[str, Any]
_console = Console(stderr=True, highlight=False)


def parse_steps(spec: Sequence[StepSpec] | None, manifest: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """``[name | {name: {options}}]`` -> ``[(name, options)]``. Options of a step named only by name
    come from the recipe's ``tags:`` entry of that name (recorded in the manifest)."""
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), Mapping) else {}
    recipe_steps = _normalise(recipe.get("tags") or [], "recipe tags")
    if spec is None:
        return recipe_steps or [(n, {}) for n in DEFAULT_STEPS]
    from_recipe = dict(recipe_steps)
    steps = [(name, opts or dict(from_recipe.get(name, {}))) for name, opts in _normalise(spec, "steps")]
    return steps


def validate_steps(spec: Sequence[StepSpec] | None, what: str = "recipe tags") -> list[str]:
    """Check a ``tags:`` list before any generation: shape, step names (the registry) and each step's
    options (its constructor, as the runner will call it, on a scratch context). Returns the columns the
    steps will add. RecipeError (one line) for anything wrong."""
    columns: list[str] = []
    for name, opts in _normalise(spec or [], what):
        cls = step_class(name)                 # unknown names: RecipeError listing the registered steps
        ctx = TagContext(directory=Path("."), manifest={}, work_dir=Path(".magpie-validate"), options=opts)
        try:
            step = cls(ctx, **opts)
        except MagpieError:
            raise
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{what}: tag step {name!r} has bad options {opts!r} "
                              f"({' '.join(str(exc).split())[:120]})", hint="fix them in the recipe") from None
        columns.extend(step.columns)
    return columns


def _normalise(spec: Any, what: str) -> list[tuple[str, dict]]:
    if isinstance(spec, (str, Mapping)):
        spec = [spec]
    out: list[tuple[str, dict]] = []
    for item in spec:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, Mapping) and len(item) == 1:
            name, opts = next(iter(item.items()))
            out.append((str(name), dict(opts or {})))
        else:
            raise RecipeError(f"bad entry in {what}: {item!r}", hint="use a step name or {name: {options}}")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise RecipeError(f"a tag step is listed twice in {what}: {names}")
    return out


def tag_dataset(directory: Path | str, steps: Sequence[StepSpec] | None = None, *,
                force: bool = False) -> dict[str, Any]:
    """Tag ``directory`` in place; returns ``{"ran": [...], "skipped": [...], "rows": {config: n}}``.

    ``steps`` default to the recipe's ``tags:`` recorded in the manifest, else the default steps. The
    directory must be whole (:func:`verify_dataset`); the tag holds its lock while it works."""
    directory = Path(directory)
    verify_dataset(directory, action="tag")
    try:
        with dataset_lock(directory, "tag"):
            return _tag_locked(directory, steps, force)
    except OSError as exc:
        raise os_error(exc, f"cannot tag {directory}") from None


def _tag_locked(directory: Path, steps: Sequence[StepSpec] | None, force: bool) -> dict[str, Any]:
    configs = config_names(directory)
    if not configs:
        raise DatasetDirError(f"{directory} holds no config (no */train-*.parquet)",
                              hint="pass a directory written by `magpie-hub build`")
    manifest = read_manifest(directory)
    plan = parse_steps(steps, manifest)
    classes = [(step_class(name), opts) for name, opts in plan]  # unknown names fail here

    data = {c: read_config(directory, c) for c in configs}
    for c, d in data.items():
        if d.num_rows == 0:
            raise DatasetDirError(f"config {c!r} in {directory} has no rows", hint="rebuild or remove it")
        missing = [col for col in REQUIRED_COLUMNS if col not in d.table.column_names]
        if missing:
            raise DatasetDirError(f"config {c!r} lacks the columns {missing}",
                                  hint="tag a directory written by `magpie-hub build`")

    ctx_base = dict(directory=directory, manifest=manifest, configs=tuple(configs))
    todo: list[tuple[TagStep, list[str]]] = []
    skipped: list[str] = []
    available = set.intersection(*(set(d.table.column_names) for d in data.values()))
    for cls, opts in classes:
        step = cls(TagContext(work_dir=work_dir(directory, cls.name), options=opts, **ctx_base), **opts)
        pending = configs if force else [c for c in configs
                                          if any(col not in data[c].table.column_names for col in step.columns)]
        if pending and step.scope == "global":
            pending = configs  # global columns depend on every row: recompute all of them together
        lacking = [col for col in step.requires if col not in available]
        if pending and lacking:
            raise DatasetDirError(f"tag step {step.name!r} needs the columns {lacking}",
                                  hint="add the steps that produce them before it")
        available |= set(step.columns)
        if pending:
            todo.append((step, pending))
        else:
            skipped.append(step.name)
    for step, _ in todo:
        step.setup()  # models load (or fail with one line) before anything is computed or written

    changed: set[str] = set()
    for step, pending in todo:
        started = time.perf_counter()
        if step.scope == "global":
            outputs = _run_global(step, {c: data[c] for c in pending})
        else:
            outputs = {c: _run_rows(step, data[c]) for c in pending}
        step.close()
        for c, cols in outputs.items():
            data[c] = with_columns(data[c], cols, step.features)
            changed.add(c)
        rows = sum(data[c].num_rows for c in pending)
        secs = time.perf_counter() - started
        _console.print(f"tag {step.name}: {rows} rows in {secs:.1f}s ({rows / max(secs, 1e-9):.0f} rows/s)")

    for c in configs:
        if c in changed:
            write_config(directory, data[c])
    ran = [s.name for s, _ in todo]
    if ran or "tags" not in manifest:
        _record(directory, [s for s, _ in todo], [n for n, _ in plan])
    for step, _ in todo:
        shutil.rmtree(step.context.work_dir / "ckpt", ignore_errors=True)
    return {"ran": ran, "skipped": skipped, "rows": {c: data[c].num_rows for c in configs}}


# -- checkpoints -----------------------------------------------------------------------------------

def _data_key(step: TagStep, config: ConfigData) -> str:
    """Identifies the rows (uuids, order) and the step's settings a checkpoint was computed for."""
    h = hashlib.sha256(json.dumps(step.fingerprint(), sort_keys=True).encode())
    for uuid in config.table.column("uuid").to_pylist():
        h.update(str(uuid).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _ckpt_dir(step: TagStep, config: ConfigData) -> Path:
    """``.magpie/tags/<step>/ckpt/<config>/`` for the current rows+settings (stale ones are removed)."""
    root = step.context.work_dir / "ckpt" / config.name
    key = _data_key(step, config)
    if root.is_dir() and (root / "KEY").is_file() and (root / "KEY").read_text().strip() != key:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "KEY").write_text(key)
    return root


def _run_rows(step: TagStep, config: ConfigData) -> dict[str, list]:
    root = _ckpt_dir(step, config)
    size = int(step.options.get("batch_size") or step.batch_size)
    n = config.num_rows
    schema = step.features.arrow_schema
    parts, resumed = [], 0
    for i, start in enumerate(range(0, n, size)):
        path = root / f"part-{i:05d}.parquet"
        rows = min(size, n - start)
        if path.is_file():
            part = pq.read_table(path)
            if part.num_rows == rows and set(step.columns) <= set(part.column_names):
                parts.append(part.select(list(step.columns)).cast(schema))
                resumed += 1
                continue
        batch = config.table.slice(start, rows).select(list(step.requires)).to_pydict()
        out = step.run(batch)
        _check_output(step, out, rows)
        part = pa.Table.from_pydict({c: out[c] for c in step.columns}, schema=schema)
        write_parquet_atomic(part, path)
        parts.append(part)
    if resumed:
        _console.print(f"tag {step.name}: {config.name}: resumed {resumed}/{len(parts)} checkpointed chunks")
    table = pa.concat_tables(parts)
    return {c: table.column(c).to_pylist() for c in step.columns}


def _run_global(step: TagStep, data: dict[str, ConfigData]) -> dict[str, dict[str, list]]:
    roots = {c: _ckpt_dir(step, d) for c, d in data.items()}
    done = {c: roots[c] / "result.parquet" for c in data}
    if all(p.is_file() for p in done.values()):
        _console.print(f"tag {step.name}: resumed the checkpointed result")
        return {c: pq.read_table(p).to_pydict() for c, p in done.items()}
    inputs = {c: d.table.select(list(step.requires)).to_pydict() for c, d in data.items()}
    out = step.run_global(inputs)
    for c, d in data.items():
        if c not in out:
            raise RuntimeError(f"tag step {step.name!r} returned no columns for config {c!r}")
        _check_output(step, out[c], d.num_rows)
        write_parquet_atomic(pa.Table.from_pydict({k: out[c][k] for k in step.columns},
                                                  schema=step.features.arrow_schema), done[c])
    return {c: {k: out[c][k] for k in step.columns} for c in data}


def _check_output(step: TagStep, out: Mapping[str, list], rows: int) -> None:
    for col in step.columns:
        if col not in out or len(out[col]) != rows:
            got = len(out[col]) if col in out else "no"
            raise RuntimeError(f"tag step {step.name!r} returned {got} values of {col!r} for {rows} rows")


# -- manifest, analysis, card ----------------------------------------------------------------------

def _versions() -> dict[str, str]:
    out = {}
    for dist in ("magpie-hub", "datasets", "transformers", "sentence-transformers", "faiss-cpu",
                 "lingua-language-detector", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _record(directory: Path, ran: list[TagStep], order: list[str]) -> None:
    def change(manifest: dict[str, Any]) -> None:
        section = manifest.setdefault("tags", {})
        steps = section.setdefault("steps", {})
        for step in ran:
            steps[step.name] = {**step.info(), "tagged_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        section["order"] = list(dict.fromkeys([*section.get("order", []), *order]))
        section["versions"] = _versions()
    update_manifest(directory, change)
