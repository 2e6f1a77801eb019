"""``magpie_manifest.json``: what was built, from what, with what, and what it cost.

Top-level keys written by the build (other stages add theirs, e.g. ``tags``, ``filter``):
``magpie_hub`` (version), ``created_at``/``updated_at``, ``recipe`` (the validated recipe, overrides
applied), ``recipe_path``, ``recipe_sha256``, ``model`` {id, revision, sha, backend}, ``backend``
{name, options without secrets, info}, ``templates`` (the chat-format pieces derived from the model's own
template) and ``system_templates`` (pre-query with each system prompt used), ``versions`` (libraries),
``device``, ``card`` (the recipe's card overrides), ``configs`` {name: per-config entry, see
:func:`config_entry`} and ``totals``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from magpie_hub.dataset.directory import update_manifest
from magpie_hub.errors import RecipeError, redact_mapping
from magpie_hub.recipe.plan import exact_counts
from magpie_hub.recipe.schema import Recipe

LIBRARIES = ("magpie-hub", "torch", "transformers", "tokenizers", "datasets", "huggingface_hub", "accelerate",
             "pyarrow", "pydantic")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_description(world: int) -> dict[str, Any]:
    try:
        import torch

        cuda = torch.cuda.is_available()
        name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine() or "cpu")
    except Exception:  # noqa: BLE001 - informational only
        cuda, name = False, platform.machine() or "cpu"
    return {"kind": "cuda" if cuda else "cpu", "name": name, "processes": world, "platform": sys.platform}


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def config_entry(recipe: Recipe, name: str, stats: list[dict], *, shards: int, rows_by_rank: dict[str, int],
                 replaced: int = 0, kept_tokens: int = 0, truncated_rows: int = 0,
                 truncated_turns: dict[str, int] | None = None) -> dict[str, Any]:
    """Per-config manifest entry, over all (resumed) runs: rows written per rank, rows replaced (their own
    spec exhausted its attempts), kept tokens (of the turns in the written rows) and kept truncated turns
    come from the checkpoint pieces; drops, generated tokens and wall time from the pieces' stats files
    (refreshed every ~2 s, so a killed run's last seconds may be missing from them)."""
    cfg = recipe.configs[name]
    dropped: Counter = Counter()
    for s in stats:
        dropped.update(s.get("dropped") or {})
    device_s = sum(float(s.get("wall_s") or 0) for s in stats)
    mixes = recipe.instruction_sampling
    entry: dict[str, Any] = {
        "rows": cfg.rows, "turns": cfg.turns, "category": cfg.category, "shards": shards,
        "fingerprint": recipe.fingerprint(name), "settings": recipe.generation_settings(name),
        "instruction_sampling": [{"temperature": m.temperature, "top_p": m.top_p, "rows": n}
                                 for m, n in zip(mixes, exact_counts([m.share for m in mixes], cfg.rows), strict=True)],
        "generated_rows": sum(rows_by_rank.values()),
        "generated_rows_by_rank": rows_by_rank,
        "dropped": dict(sorted(dropped.items())),
        "replaced": int(replaced),
        "truncated_rows": int(truncated_rows),
        "truncated_turns": dict(sorted((truncated_turns or {}).items())),
        # a killed run's last stats may lag its rows: generated is at least what was kept
        "generated_tokens": max(sum(int(s.get("generated_tokens") or 0) for s in stats), int(kept_tokens)),
        "kept_tokens": int(kept_tokens),
        "wall_time_s": round(sum(float(s.get("wall_s") or 0) / max(int(s.get("world") or 1), 1) for s in stats), 3),
        "device_hours": round(device_s / 3600.0, 6),
        "processes": max([int(s.get("world") or 1) for s in stats] or [1]),
        "backends": sorted({str(s.get("backend")) for s in stats if s.get("backend")}),
        "complete": True,   # its shards are merged (see magpie_hub.dataset.verify)
    }
    entry["kept_token_ratio"] = round(entry["kept_tokens"] / entry["generated_tokens"], 4) \
        if entry["generated_tokens"] else None
    if cfg.categories:
        names = list(cfg.categories)
        entry["categories"] = {n: {"weight": cfg.categories[n] / sum(cfg.categories.values()), "rows": k}
                               for n, k in zip(names, exact_counts([cfg.categories[n] for n in names], cfg.rows), strict=True)}
    if cfg.system_prompt:
        entry["system_prompt"] = cfg.system_prompt
    return entry


def _system_templates(recipe: Recipe, fmt, configs: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in configs:
        cfg = recipe.configs.get(name)
        if cfg is None:
            continue
        cats = ([cfg.category] if cfg.category else []) + list(cfg.categories or {})
        for cat in cats:
            out[f"category:{cat}"] = fmt.pre_query_system(recipe.all_category_prompts[cat])
        if cfg.system_prompt:
            out[f"config:{name}"] = fmt.pre_query_system(cfg.system_prompt)
        if cfg.turns > 1:
            out["multi_turn"] = fmt.pre_query_system(recipe.multi_turn_system_prompt)
    return out


def check_same_recipe(manifest: dict[str, Any], recipe: Recipe, out: Path) -> None:
    """A dataset directory holds one recipe's data: refuse (without ``--fresh``) to build another recipe
    (other name) or another model into it, which would mix their rows and take over its card."""
    old = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else None
    if not old:
        return
    model = (manifest.get("model") or {}).get("id") if isinstance(manifest.get("model"), dict) else None
    if old.get("name") != recipe.name or (model and model != recipe.model):
        raise RecipeError(f"--out {out} holds dataset {old.get('name')!r} built from model {model!r} by another "
                          f"recipe (this one is {recipe.name!r} on {recipe.model!r})",
                          hint="choose another --out, or pass --fresh to replace it")


def mark_started(out: Path) -> None:
    """A build starts writing ``out``: the directory is incomplete until :func:`build_manifest_update` with
    ``complete=True`` at the very end (``tag``, ``filter``, ``card``, ``publish`` refuse it until then)."""
    update_manifest(out, lambda m: m.__setitem__("complete", False))


def build_manifest_update(out: Path, recipe: Recipe, recipe_path: Path, fmt, info, entries: dict[str, dict],
                          world: int, complete: bool | None = None) -> dict[str, Any]:
    """Merge this build's facts and the new config ``entries`` into ``out``'s manifest (atomically);
    ``complete`` (when given) records whether the whole build finished."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def change(m: dict[str, Any]) -> None:
        if complete is not None:
            m["complete"] = complete
        m.setdefault("created_at", now)
        m["updated_at"] = now
        m["magpie_hub"] = library_versions()["magpie-hub"]
        m["recipe"] = redact_mapping(recipe.model_dump(mode="json"))   # every section: card, tags, options
        m["recipe_path"] = str(recipe_path)
        m["recipe_sha256"] = recipe_sha256(recipe)
        m["model"] = {"id": recipe.model, "revision": recipe.revision,
                      "sha": getattr(info, "model_revision", None), "backend": recipe.backend}
        m["backend"] = {"name": recipe.backend, "options": redact_mapping(recipe.backend_options),
                        "info": {"name": info.name, "model_id": info.model_id,
                                 "max_concurrency": info.max_concurrency,
                                 **({"endpoints": info.extra["pool"]} if info.extra.get("pool") else {})}}
        m["templates"] = fmt.to_dict()
        configs = m.setdefault("configs", {})
        configs.update(entries)
        m["system_templates"] = _system_templates(recipe, fmt, configs)
        m["versions"] = library_versions()
        m["device"] = device_description(world)
        m["card"] = redact_mapping(recipe.card.model_dump(mode="json", exclude_none=True))
        generated = sum(int(c.get("generated_tokens") or 0) for c in configs.values())
        kept = sum(int(c.get("kept_tokens") or 0) for c in configs.values())
        m["totals"] = {
            "rows": sum(int(c.get("rows") or 0) for c in configs.values()),
            "replaced": sum(int(c.get("replaced") or 0) for c in configs.values()),
            "generated_tokens": generated,
            "kept_tokens": kept,
            "kept_token_ratio": round(kept / generated, 4) if generated else None,
            "dropped": dict(sum((Counter(c.get("dropped") or {}) for c in configs.values()), Counter())),
            "wall_time_s": round(sum(float(c.get("wall_time_s") or 0) for c in configs.values()), 3),
            "device_hours": round(sum(float(c.get("device_hours") or 0) for c in configs.values()), 6),
        }

    return update_manifest(out, change)
