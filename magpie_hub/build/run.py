"""The build: recipe -> checkpointed generation (resumable, data-parallel) -> shards, manifest, card.

``run_build(recipe, recipe_path=..., out=...)`` validates everything first (recipe, config names, model and chat template,
backend, output dir) and writes nothing into ``out`` on bad input. Then, per config:

1. rank 0 records the config's fingerprint under ``DIR/.magpie/build/{config}/`` (a changed recipe on an
   existing dir is refused unless ``fresh``); every process scans the checkpoint for finished indices;
2. each process takes ``missing[rank::world]`` of the missing indices and runs the conversation engine on
   them, appending each finished row to its own checkpoint piece (:mod:`magpie_hub.build.checkpoint`);
3. rank 0 waits for all, then writes exactly ``rows`` rows ordered by index as
   ``{config}/train-0000i-of-0000n.parquet`` (:mod:`magpie_hub.dataset.shards`) and updates the manifest.

Tagging and the card follow in :mod:`magpie_hub.pipeline`, not here. Data-parallel: started under
``torchrun --nproc_per_node K`` or ``accelerate launch``, processes coordinate through accelerate's
``PartialState`` (gloo on CPU).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from magpie_hub.build.checkpoint import Checkpoint, PieceWriter, read_rows
from magpie_hub.build.dist import Dist
from magpie_hub.build.manifest import build_manifest_update, config_entry
from magpie_hub.build.progress import BuildProgress, summary_table
from magpie_hub.chat.format import load_chat_format
from magpie_hub.dataset.directory import read_manifest, update_manifest
from magpie_hub.dataset.shards import shard_count, write_config_shards
from magpie_hub.errors import DatasetDirError, MagpieError, RecipeError
from magpie_hub.generate.backends import SamplingParams, backend_class, get_backend
from magpie_hub.generate.engine import (
    CleanupOptions,
    ConversationEngine,
    ConversationSpec,
    conversation_to_row,
)
from magpie_hub.layout import MANIFEST, WORK_DIR, shard_paths
from magpie_hub.models import resolve_model
from magpie_hub.recipe.schema import Recipe


class BuildIncompleteError(MagpieError):
    """Some rows could not be generated within max_attempts; the checkpoint is kept for a re-run."""


def check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file, a foreign non-empty folder, or not writable (writes nothing)."""
    if out.exists() and not out.is_dir():
        raise DatasetDirError(f"--out {out} is a file", hint="choose a directory path")
    if out.is_dir():
        if any(out.iterdir()) and not (out / MANIFEST).exists() and not (out / WORK_DIR).exists():
            raise DatasetDirError(f"--out {out} is a non-empty folder that is not a magpie-hub dataset",
                                  hint="choose an empty or new --out directory")
        probe = out
    else:
        probe = out.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise DatasetDirError(f"cannot create --out {out}: {probe} is not a directory", hint="choose another --out")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise DatasetDirError(f"cannot write to {probe} ({exc.strerror or exc})", hint="choose a writable --out") from None


def _changed(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "settings"


def check_fingerprints(recipe: Recipe, out: Path, names: list[str], fresh: bool) -> dict[str, str]:
    """For each config: "new", "resume" or "done"; RecipeError when the dir holds other rows (unless fresh)."""
    manifest = read_manifest(out) if out.is_dir() else {}
    status = {}
    for name in names:
        if fresh:
            status[name] = "new"
            continue
        fp, settings = recipe.fingerprint(name), recipe.generation_settings(name)
        ckpt = Checkpoint(out, name).read_fingerprint()
        entry = (manifest.get("configs") or {}).get(name) or {}
        has_shards = bool(shard_paths(out, name))
        old = ckpt or ({"fingerprint": entry.get("fingerprint"), "settings": entry.get("settings") or {}}
                       if entry else None)
        if old is None and has_shards:
            raise RecipeError(f"--out {out} already holds config {name!r} from another build",
                              hint="use --fresh to replace it or choose another --out")
        if old is not None and old.get("fingerprint") != fp:
            raise RecipeError(f"--out {out} holds config {name!r} built from a different recipe "
                              f"(changed: {_changed(old.get('settings') or {}, settings)})",
                              hint="use --fresh to discard it, or choose another --out")
        done = entry.get("fingerprint") == fp and has_shards and entry.get("rows") == recipe.configs[name].rows
        status[name] = "done" if done else ("resume" if old else "new")
    return status


def _validate_chat_format(recipe: Recipe, names: list[str]):
    """Load the model's chat format and check it supports every system prompt the configs need."""
    fmt = load_chat_format(resolve_model(recipe.model), revision=recipe.revision)
    for name in names:
        plan = recipe.plan(name)
        systems = {plan.cfg.system_prompt} | {recipe.all_category_prompts[c] for c in
                                              ([plan.cfg.category] if plan.cfg.category else []) + list(plan.cfg.categories or {})}
        for text in systems - {None}:
            fmt.pre_query_system(text)
        if plan.cfg.turns > 1:
            fmt.user_prompt([("hello", "hi")], system=recipe.multi_turn_system_prompt)
    return fmt


def _specs(recipe: Recipe, name: str, indices: list[int]):
    plan = recipe.plan(name)
    resp = SamplingParams(temperature=recipe.response_sampling.temperature, top_p=recipe.response_sampling.top_p,
                          max_new_tokens=recipe.max_new_tokens.response, seed=recipe.seed)
    for i in indices:
        row = plan.row(i)
        yield ConversationSpec(
            config=name, index=i, uuid=row.uuid, turns=plan.cfg.turns, category=row.category,
            system_prompt=row.system_prompt,
            instruction_params=SamplingParams(temperature=row.mix.temperature, top_p=row.mix.top_p,
                                              max_new_tokens=recipe.max_new_tokens.instruction, seed=recipe.seed),
            response_params=resp, instruction_stop_newline=recipe.cleanup.newline_stop,
        )


async def _generate_config(recipe: Recipe, name: str, backend, fmt, indices: list[int], writer: PieceWriter,
                           progress: BuildProgress) -> None:
    engine = ConversationEngine(backend, fmt, cleanup=CleanupOptions(**recipe.cleanup.model_dump()),
                                multi_turn_system_prompt=recipe.multi_turn_system_prompt,
                                max_attempts=recipe.max_attempts,
                                concurrency=recipe.concurrency or backend.info().max_concurrency or 64,
                                seed=recipe.seed)
    try:
        async for conv in engine.run(_specs(recipe, name, indices)):
            row = conversation_to_row(conv, model=recipe.model, chat_format=fmt, seed=recipe.seed)
            writer.write(conv.spec.index, conv.spec.uuid, row)
            writer.update(dropped=engine.dropped, generated_tokens=engine.generated_tokens)
            progress.update(name, new_rows=writer.rows, tokens=engine.generated_tokens, dropped=engine.dropped)
    finally:
        writer.update(dropped=engine.dropped, generated_tokens=engine.generated_tokens)
        writer.close()


def _merge(recipe: Recipe, out: Path, name: str) -> dict[str, Any]:
    """Rank 0: write the config's shards from all checkpoint pieces; return its manifest entry."""
    plan = recipe.plan(name)
    ckpt = Checkpoint(out, name)
    scan = ckpt.scan(plan.rows, plan.uuid)
    missing = plan.rows - len(scan.locations)
    stats = ckpt.stats()
    if missing:
        dropped = sum((Counter(s.get("dropped") or {}) for s in stats), Counter())
        raise BuildIncompleteError(
            f"config {name!r}: {missing} of {plan.rows} rows failed {recipe.max_attempts} attempts "
            f"(dropped so far: {dict(dropped) or 'none'})",
            hint="raise max_attempts in the recipe and re-run the same command: it resumes, finished rows are kept")
    locations = [scan.locations[i] for i in range(plan.rows)]
    shards = shard_count(plan.rows, sum(length for _, _, length in locations))
    paths = write_config_shards(out, name, read_rows(locations), plan.rows, shards=shards)
    return config_entry(recipe, name, stats, shards=len(paths), rows_by_rank=scan.rows_by_rank())


@dataclass
class BuildResult:
    """What :func:`run_build` hands back: the output directory, the configs it covered and the manifest
    (empty on ranks other than 0, which leave all writing after generation to rank 0)."""

    out: Path
    configs: list[str]
    manifest: dict[str, Any]
    main: bool


def run_build(rec: Recipe, *, recipe_path: Path, out: str | Path | None = None, configs: list[str] | None = None,
              fresh: bool = False, console: Console | None = None) -> BuildResult:
    """Build the loaded recipe ``rec`` (read from ``recipe_path``) into ``out`` (default ``data/{name}``)."""
    started = time.monotonic()
    recipe_path = Path(recipe_path)
    names = rec.select(configs)
    out = Path(out) if out is not None else Path("data") / rec.name
    backend_class(rec.backend)                      # unknown backend -> RecipeError
    check_out_dir(out)
    status = check_fingerprints(rec, out, names, fresh)
    fmt = _validate_chat_format(rec, names)
    dist = Dist()
    console = console or Console(stderr=True)
    options = dict(rec.backend_options)
    if rec.backend == "transformers" and "device_map" not in options and dist.device_map() is not None:
        options["device_map"] = dist.device_map()
    bk = get_backend(rec.backend, rec.model, revision=rec.revision, **options)
    entries: dict[str, dict] = {}
    new_rows: Counter = Counter()
    return_manifest: dict[str, Any] = {}

    async def main() -> None:
        async with bk:
            # Everything is validated and the backend is up: only now touch the output dir.
            if dist.main:
                _prepare(rec, out, names, status, fresh)
            status.update(dist.broadcast(status))
            with BuildProgress(console, enabled=dist.main, world=dist.world) as progress:
                for name in names:
                    if status[name] == "done":
                        continue
                    plan = rec.plan(name)
                    scan = Checkpoint(out, name).scan(plan.rows, plan.uuid)
                    dist.barrier()                  # everyone scanned before anyone appends
                    missing = [i for i in range(plan.rows) if i not in scan.locations]
                    mine = missing[dist.rank::dist.world]
                    progress.start(name, plan.rows, plan.rows - len(missing))
                    if mine:
                        writer = PieceWriter(Checkpoint(out, name), rank=dist.rank, world=dist.world,
                                             backend=rec.backend)
                        await _generate_config(rec, name, bk, fmt, mine, writer, progress)
                        new_rows[name] += writer.rows
                    dist.barrier()
                    if dist.main:
                        entries[name] = _merge(rec, out, name)
                        entries[name]["new_rows"] = len(missing)
                        return_manifest.update(build_manifest_update(out, rec, recipe_path, fmt, bk.info(),
                                                                     {name: entries[name]}, dist.world))
                        Checkpoint(out, name).drop_pieces()
                    dist.barrier()

    asyncio.run(main())
    if not dist.main:
        return BuildResult(out, names, {}, False)
    manifest = build_manifest_update(out, rec, recipe_path, fmt, bk.info(), {}, dist.world)
    shown = {n: {**(manifest.get("configs") or {}).get(n, {}), "new_rows": entries.get(n, {}).get("new_rows", 0)}
             for n in names}
    console.print(summary_table(shown, run_wall_s=time.monotonic() - started))
    console.print(f"wrote {out}", highlight=False)
    return BuildResult(out, names, manifest, True)


def _prepare(rec: Recipe, out: Path, names: list[str], status: dict[str, str], fresh: bool) -> None:
    """Rank 0: create the dir; with ``fresh`` discard the selected configs; record fingerprints."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        ckpt = Checkpoint(out, name)
        if fresh:
            ckpt.clear()
            shutil.rmtree(out / name, ignore_errors=True)
        if status[name] != "done":
            ckpt.write_fingerprint(rec.fingerprint(name), rec.generation_settings(name))
    if fresh and (out / MANIFEST).exists():
        update_manifest(out, lambda m: [(m.get("configs") or {}).pop(n, None) for n in names])
