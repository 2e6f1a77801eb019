"""Text helpers for the dataset card: escaping filters for the Jinja2 templates, manifest -> provenance.

Everything that comes from generated rows, the recipe or the manifest reaches the card through one of:

- ``md``: inline Markdown text (one line; HTML characters become entities, Markdown punctuation is
  backslash-escaped, a leading list/heading marker is neutralised, ``|`` is safe inside table cells);
- ``code``: a JSON string literal, for lines inside fenced code blocks (no raw newline, so it can
  neither close the fence nor start a new block).

:func:`raw_html` is the check the card validator runs: raw HTML anywhere outside fenced code.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

from magpie_hub.errors import has_secret, is_secret_key

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+!|~$])")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HTML_TAG = re.compile(r"<[A-Za-z!/?]")
_LOCAL_PATH = re.compile(r"^(~|/|[A-Za-z]:[\\/]|\.\.?/)")
# keys never shown, besides secret keys (errors.is_secret_key): local paths, hosts, users, headers
_PRIVATE_KEYS = {"headers", "out", "output", "output_dir", "path", "cwd", "hostname", "host", "user"}


def one_line(value: Any, limit: int | None = None) -> str:
    """Collapse whitespace, drop control/bidi characters, optionally truncate."""
    text = " ".join(_CONTROL.sub(" ", str(value)).split())
    return truncate(text, limit) if limit else text


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def md(value: Any, limit: int | None = None) -> str:
    """Inline Markdown-safe text (also safe in a table cell and after a list marker)."""
    if value is None:
        return "–"
    text = html.escape(one_line(value, limit), quote=False)
    text = _MD_PUNCT.sub(r"\\\1", text)
    text = re.sub(r"^(\d{1,9})([.)])(?=\s|$)", r"\1\\\2", text)  # "1. " would start a list
    if re.match(r"[-=:](\s|[-=]|$)", text):                        # list item, rule, setext, definition
        text = "\\" + text
    return text


def code(value: Any) -> str:
    """A JSON literal (strings, lists, numbers as they are) for a line inside a fenced code block."""
    text = json.dumps(value if isinstance(value, (str, int, float, bool, list)) or value is None else str(value),
                      ensure_ascii=False, default=str)
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def num(value: Any, digits: int = 1) -> str:
    """Numbers with thousands separators; anything else escaped as text."""
    if isinstance(value, bool) or value is None:
        return md(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:,.{digits}f}"
    return md(value)


def pct(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "–"


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def flatten(value: Any, prefix: str = "", limit: int = 60) -> list[tuple[str, Any]]:
    """``[(dotted.key, scalar), ...]`` of a JSON value, without secrets, local paths or private keys."""
    out: list[tuple[str, Any]] = []

    def walk(obj: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                if str(k).lower() not in _PRIVATE_KEYS and not is_secret_key(k):
                    walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, list) and obj and all(isinstance(x, (dict, list)) for x in obj):
            for i, v in enumerate(obj):
                walk(v, f"{key}[{i}]")
        elif isinstance(obj, list):
            out.append((key, ", ".join(str(x) for x in obj)))
        elif isinstance(obj, str) and (_LOCAL_PATH.match(obj) or has_secret(obj)):
            out.append((key, "(local path)" if _LOCAL_PATH.match(obj) else "***"))
        else:
            out.append((key, obj))

    walk(value, prefix)
    return out


def raw_html(text: str) -> str | None:
    """The first raw HTML tag outside fenced code blocks, or None."""
    fence = None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
            tag = _HTML_TAG.search(line)
            if tag:
                return line[tag.start(): tag.start() + 40]
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip().strip(fence[0]):
            fence = None
    return None


def _first(*values: Any) -> Any:
    return next((v for v in values if v not in (None, "", {}, [])), None)


def provenance(manifest: dict) -> dict:
    """What the card's provenance section shows, from a manifest of any completeness."""
    recipe = mapping(manifest.get("recipe"))
    configs = mapping(manifest.get("configs"))
    templates = mapping(_first(manifest.get("templates"), manifest.get("chat_format")))
    pieces = [(k, v) for k, v in templates.items() if v is not None and not isinstance(v, dict)]
    pieces += [(f"system {k}", v) for k, v in mapping(manifest.get("system_templates")).items() if v is not None]
    versions: dict = {}
    for source in (manifest.get("versions"), manifest.get("library_versions"),
                   mapping(manifest.get("tags")).get("versions")):
        versions.update({k: v for k, v in mapping(source).items() if isinstance(v, (str, int, float))})
    hours = _first(mapping(manifest.get("totals")).get("device_hours"), manifest.get("device_hours"))
    if hours is None:
        per_config = [c.get("device_hours") for c in configs.values() if isinstance(c, dict)]
        numbers = [h for h in per_config if isinstance(h, (int, float))]
        hours = sum(numbers) if numbers else None
    backend = _first(manifest.get("backend"), recipe.get("backend"))
    if isinstance(backend, dict):
        backend = backend.get("name")
    device = mapping(manifest.get("device"))
    settings = []
    for name, cfg in mapping(recipe.get("configs")).items():
        cfg, built = mapping(cfg), mapping(configs.get(name))
        steer = _first(cfg.get("category"), cfg.get("categories"), cfg.get("system_prompt"))
        mixes = [m for m in built.get("instruction_sampling") or [] if isinstance(m, dict)]
        settings.append({"name": name, "rows": cfg.get("rows"), "turns": cfg.get("turns", 1),
                         "steering": ", ".join(f"{k} {v}" for k, v in steer.items()) if isinstance(steer, dict)
                         else steer,
                         "mix_rows": ", ".join(f"T={m.get('temperature')}/top_p={m.get('top_p')}: {m.get('rows')}"
                                               for m in mixes)})
    tags = mapping(mapping(manifest.get("tags")).get("steps"))
    return {
        "recipe_name": recipe.get("name"), "description": recipe.get("description"),
        "magpie_hub": manifest.get("magpie_hub"), "backend": backend,
        "device": " ".join(str(device[k]) for k in ("kind", "name") if device.get(k))
        + (f" x {device['processes']} processes" if isinstance(device.get("processes"), int)
           and device["processes"] > 1 else "") if device else None,
        "seed": _first(manifest.get("seed"), recipe.get("seed")),
        "created": _first(manifest.get("created_at"), manifest.get("created")),
        "updated": manifest.get("updated_at"),
        "templates": pieces,
        "instruction_sampling": [m for m in recipe.get("instruction_sampling") or [] if isinstance(m, dict)],
        "response_sampling": mapping(recipe.get("response_sampling")),
        "max_new_tokens": mapping(recipe.get("max_new_tokens")),
        "config_settings": settings,
        "versions": sorted(versions.items()),
        "device_hours": hours,
        "tag_steps": [(name, ", ".join(mapping(info).get("columns") or []),
                       ", ".join(f"{k}={v}" for k, v in flatten(mapping(info).get("options"), limit=6)))
                      for name, info in tags.items()],
    }


def family(manifest: dict) -> dict | None:
    """The Magpie-family facts of the configs (response models, sources, preference pairs, reasoning split),
    or None for a plain MAGPIE build."""
    rows: dict[str, list[dict]] = {"response_models": [], "sources": [], "preference": [], "reasoning": []}
    for name, cfg in mapping(manifest.get("configs")).items():
        cfg = mapping(cfg)
        rm = mapping(cfg.get("response_model"))
        if rm.get("id"):
            rows["response_models"].append({"config": name, **rm})
        src = mapping(cfg.get("source"))
        if src:
            rows["sources"].append({"config": name, "from": _first(src.get("repo"), src.get("path")),
                                    "revision": src.get("revision"), "sha": src.get("sha"),
                                    "subset": src.get("config"), "mode": src.get("mode")})
        pref = mapping(cfg.get("preference"))
        if pref:
            reward = mapping(pref.get("reward"))
            rows["preference"].append({"config": name, "k": pref.get("k"), "temperature": pref.get("temperature"),
                                       "reward_model": reward.get("model"), "scorer": reward.get("scorer"),
                                       "margins": mapping(pref.get("margins"))})
        reasoning = mapping(cfg.get("reasoning"))
        if reasoning:
            rows["reasoning"].append({"config": name, **reasoning})
    return rows if any(rows.values()) else None


def response_model_ids(manifest: dict) -> list[tuple[str, str | None]]:
    """(model id, licence override) of every config's response model (card licence combination)."""
    out = []
    for cfg in mapping(manifest.get("configs")).values():
        rm = mapping(mapping(cfg).get("response_model"))
        if rm.get("id") and rm.get("template") != "urial":   # base-model answers: base_output only
            out.append((str(rm["id"]), rm.get("license")))
    return list(dict.fromkeys(out))


def filter_summary(section: Any) -> dict | None:
    """The manifest's ``filter`` section as {name, description, rows_in, rows_out, steps, other}."""
    section = mapping(section)
    if not section:
        return None
    steps = [s for s in section.get("steps") or [] if isinstance(s, dict)]
    known = {"name", "description", "rows_in", "rows_out", "steps", "rules", "input"}
    return {
        "name": section.get("name"), "description": section.get("description"),
        "rows_in": mapping(section.get("rows_in")), "rows_out": mapping(section.get("rows_out")),
        "steps": [{"rule": _first(s.get("rule"), s.get("kind")), "removed": mapping(s.get("removed")),
                   "removed_null": mapping(s.get("removed_null"))} for s in steps],
        "other": flatten({k: v for k, v in section.items() if k not in known}),
    }


FILTERS = {"md": md, "code": code, "num": num, "human_bytes": human_bytes}
GLOBALS = {"pct": pct, "flatten": flatten}
