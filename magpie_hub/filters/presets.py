"""Filter recipes: the built-in presets (package data ``magpie_hub/data/filters/*.yaml``) or a user YAML.

A filter YAML::

    name: my-filter            # optional (defaults to the file name)
    description: ...           # optional
    rules:                     # applied in order; keep_longest rules always run last
      - input_quality >= good
      - 'instruction not endswith ":"'
      - dedup
      - keep_longest: {n: 300000, by: response_chars}
      # stratified (Table 5's Filter6): a balance rule right before keep_longest sets its strata
      # - balance: {by: difficulty, shares: {"<= easy": 0.5, ">= medium": 0.5}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from magpie_hub.errors import RecipeError
from magpie_hub.filters.balance import BalanceRule
from magpie_hub.filters.base import FilterRule
from magpie_hub.filters.rules import KeepLongestRule, parse_rule


class _FilterFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    rules: list[Any]


@dataclass
class FilterSpec:
    """A parsed filter recipe; ``rules`` are in application order (selection rules moved last)."""

    name: str
    source: str
    description: str = ""
    rules: list[FilterRule] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "description": self.description,
                "rules": [r.describe() for r in self.rules]}


def preset_names() -> list[str]:
    folder = resources.files("magpie_hub") / "data" / "filters"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_preset(name: str) -> str | None:
    item = resources.files("magpie_hub") / "data" / "filters" / f"{name}.yaml"
    return item.read_text(encoding="utf-8") if item.is_file() else None


def parse_spec(text: str, *, default_name: str, source: str) -> FilterSpec:
    """Parse a filter YAML text into a :class:`FilterSpec` (RecipeError naming the fix on bad input)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"filter file {source} is not valid YAML{where}; fix its syntax") from None
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise RecipeError(f"filter file {source} must be a mapping with a 'rules:' list")
    try:
        parsed = _FilterFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "top level"
        raise RecipeError(f"filter file {source}: {loc}: {err['msg']} (allowed keys: name, description, rules)") \
            from None
    if not parsed.rules:
        raise RecipeError(f"filter file {source} has no rules; add at least one under 'rules:'")
    rules: list[FilterRule] = []
    for i, entry in enumerate(parsed.rules, 1):
        try:
            rules.append(parse_rule(entry))
        except RecipeError as exc:
            raise RecipeError(f"filter file {source}, rule {i}: {exc}") from None
    # "lengths last": selection rules see only rows that passed every row-wise rule (paper Table 5).
    ordered = [r for r in rules if not r.selection] + [r for r in rules if r.selection]
    _link_balance(ordered, source)
    return FilterSpec(name=parsed.name or default_name, source=source, description=parsed.description,
                      rules=ordered)


def _link_balance(rules: list[FilterRule], source: str) -> None:
    """A ``balance`` rule sets the strata of the ``keep_longest`` right after it (filters/balance.py)."""
    for i, rule in enumerate(rules):
        if isinstance(rule, BalanceRule):
            following = rules[i + 1] if i + 1 < len(rules) else None
            if not isinstance(following, KeepLongestRule):
                raise RecipeError(f"filter file {source}: a balance rule must be followed by keep_longest "
                                  "(it sets the strata of what keep_longest keeps)")
            following.balance = rule


def recipe_filter_spec(value: str | dict | list, recipe_dir: Path) -> FilterSpec:
    """A recipe's ``filters:``: a preset name, a filter YAML path (relative to the recipe), or the spec inline
    (a ``{name, description, rules}`` mapping or a list of rules)."""
    if isinstance(value, str):
        path = recipe_dir / value
        return load_filter_spec(path if path.suffix in (".yaml", ".yml") and path.is_file() else value)
    name = value.get("name") if isinstance(value, dict) else None
    return parse_spec(yaml.safe_dump(value), default_name=name or "recipe-filter", source="recipe filters:")


def load_filter_spec(preset: str | Path | FilterSpec) -> FilterSpec:
    """``preset`` is a built-in name (``pro``, ``air``, ``pro-card``), the path of a filter YAML, or a parsed spec."""
    if isinstance(preset, FilterSpec):
        return preset
    text = str(preset)
    builtin = None if Path(text).suffix in (".yaml", ".yml") else _read_preset(text)
    if builtin is not None:
        return parse_spec(builtin, default_name=text, source=f"preset:{text}")
    path = Path(text)
    if not path.is_file():
        raise RecipeError(f"unknown filter preset {text!r}; use one of {', '.join(preset_names())} or the path "
                          "of a filter YAML file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read filter file {path}: {exc.__class__.__name__}; pass a UTF-8 YAML file") \
            from None
    return parse_spec(content, default_name=path.stem, source=str(path))
