"""Build recipes: the YAML files in ``builders/``, validated with pydantic.

A recipe names the model (Hub id, local dir or ``tiny:llama3``), the backend and its options, the
sampling of instructions (a list of ``{temperature, top_p, share}`` mixes, as the paper's Pro/Air tables)
and responses (greedy by default), the clean-up rules and the configs to build. Each config is
single-/multi-turn and optionally steered by one category system prompt or a weighted mix of categories.

Everything a row's content depends on is decided here, per row index and deterministically:
:meth:`Recipe.plan` gives each index its uuid, sampling mix and category. Mix shares and category weights
are normalised (no exact-sum trap) and turned into exact counts (largest remainder), spread over the
indices by a seeded shuffle, so a config of N rows holds each mix ``round(N * share)`` times.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import uuid as uuid_lib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import BACKENDS, backend_class, option_keys, parse_backend_options

# Official MAGPIE strings (magpie-align/magpie; typos are theirs, kept verbatim).
MULTI_TURN_SYSTEM_PROMPT = (
    "You are a helpful Al assistant. The user will engage in a multi-round conversation with you, asking "
    "initial questions and following up with additional related questions. Your goal is to provide "
    "thorough,relevant and insightful responses to help the user with their queries."
)
BUILTIN_CATEGORY_PROMPTS: dict[str, str] = {
    "math": (
        "You are an AI assistant designed to provide helpful, step-by-step guidance on solving math problems. "
        "The user will ask you a wide range of complex mathematical questions.\nYour purpose is to assist "
        "users in understanding mathematical concepts, working through equations, and arriving at the "
        "correct solutions."
    ),
    "code": (
        "You are an AI assistant designed to provide helpful, step-by-step guidance on coding problems. "
        "The user will ask you a wide range of coding questions.\nYour purpose is to assist users in "
        "understanding coding concepts, working through code, and arriving at the correct solutions."
    ),
    "translation": (
        "You are an AI assistant specifically designed to provide accurate and contextually appropriate "
        "translations. Users will ask you to translate text between various languages.\nYour purpose is to "
        "assist users in understanding and conveying meaning across languages, maintaining the original "
        "context and nuances."
    ),
}
UUID_NAMESPACE = uuid_lib.UUID("6f1d3c3e-6d61-4770-9965-6875622d7575")  # fixed: uuids stable across versions
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Penalties(_Strict):
    # off by default, as the paper; transformers' semantics (the prompt's tokens count as seen)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    no_repeat_ngram_size: int | None = Field(None, ge=1, le=1024)


class SamplingMix(_Penalties):
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    share: float = Field(1.0, ge=0.0)


class ResponseSampling(_Penalties):
    temperature: float = Field(0.0, ge=0.0, le=10.0)   # greedy, as the paper
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class MaxNewTokens(_Strict):
    instruction: int = Field(512, gt=0)
    response: int = Field(2048, gt=0)


class Cleanup(_Strict):
    strip: bool = True
    drop_empty: bool = True
    drop_colon_ending: bool = True
    newline_stop: bool = False   # the official one-line instructions; off by default

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "drop_truncated" in data:
            raise ValueError("drop_truncated moved to the recipe's `truncation:` section, e.g. "
                             "truncation: {instruction: drop, response: keep}")
        return data


class LoopStopRecipe(_Strict):
    """A loop ends a turn ("loop"): ``repeats`` copies of <= ``max_ngram`` tokens, >= ``min_tokens`` in all."""

    max_ngram: int = Field(20, ge=1, le=256)
    repeats: int = Field(3, ge=2, le=100)
    min_tokens: int = Field(32, ge=2, le=100_000)


class Truncation(_Strict):
    """What a turn cut at max_new_tokens (or at a loop) does, per role: ``drop`` regenerates the
    conversation, ``keep`` keeps it with its finish reason recorded (columns ``truncated``,
    ``finish_reasons``) for filters to decide, as the official code keeps truncated responses."""

    instruction: Literal["drop", "keep"] = "drop"
    response: Literal["drop", "keep"] = "keep"
    loops: LoopStopRecipe | None = Field(default_factory=LoopStopRecipe)   # null or false: no loop stop

    @field_validator("loops", mode="before")
    @classmethod
    def _loops_off(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value


class ConfigRecipe(_Strict):
    rows: int = Field(gt=0)
    turns: int = Field(1, ge=1, le=64)
    category: str | None = None
    system_prompt: str | None = None
    categories: dict[str, float] | None = None

    @model_validator(mode="after")
    def _one_steering(self) -> ConfigRecipe:
        given = [k for k in ("category", "system_prompt", "categories") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of category / system_prompt / categories (got {', '.join(given)})")
        if self.categories is not None:
            if not self.categories:
                raise ValueError("categories is empty: give {name: weight, ...}")
            for name, weight in self.categories.items():
                if not math.isfinite(weight) or weight < 0:
                    raise ValueError(f"category weight of {name!r} must be >= 0 (got {weight})")
            if sum(self.categories.values()) <= 0:
                raise ValueError("category weights sum to 0: give at least one positive weight")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("system_prompt is empty: remove it or give the text")
        return self


class CardOptions(BaseModel):
    """Overrides for the dataset card (read by the card stage from the manifest); open to extra keys."""

    model_config = ConfigDict(extra="allow", frozen=True)
    license: str | None = None
    pretty_name: str | None = None
    language: str | list[str] | None = None
    task_categories: list[str] | None = None
    notes: list[str] | None = None   # extra "Limitations" bullets (e.g. how small the judge model is)


class Recipe(_Strict):
    name: str = "magpie"
    description: str | None = None
    model: str
    revision: str | None = None
    backend: str = "transformers"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, lt=2**63)
    instruction_sampling: list[SamplingMix] = Field(default_factory=lambda: [SamplingMix()], min_length=1)
    response_sampling: ResponseSampling = Field(default_factory=ResponseSampling)
    max_new_tokens: MaxNewTokens = Field(default_factory=MaxNewTokens)
    cleanup: Cleanup = Field(default_factory=Cleanup)
    truncation: Truncation = Field(default_factory=Truncation)
    max_attempts: int = Field(10, ge=1, le=1000)
    # a row whose conversation fails max_attempts times is generated again under a new uuid (same sampling
    # mix and category, new seeds), at most this many times; only then does the build stop (resumable)
    max_replacements: int = Field(3, ge=0, le=1000)
    # conversations in flight; None = the backend's own limit (TGI: /info max_concurrent_requests), else 64
    concurrency: int | None = Field(None, ge=1, le=100_000)
    multi_turn_system_prompt: str = MULTI_TURN_SYSTEM_PROMPT
    category_prompts: dict[str, str] = Field(default_factory=dict)
    configs: dict[str, ConfigRecipe] = Field(min_length=1)
    tags: list[str | dict[str, Any]] | None = None
    filters: str | dict[str, Any] | list[Any] | None = None
    card: CardOptions = Field(default_factory=CardOptions)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("use letters, digits, '_', '-', '.' (max 64 chars)")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model is empty: give a Hub id, a local directory or tiny:llama3")
        return value.strip()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        try:  # the backend's own options model: unknown keys and bad values are refused here, at load
            parse_backend_options(self.backend, self.backend_options)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        if sum(m.share for m in self.instruction_sampling) <= 0:
            raise ValueError("instruction_sampling shares sum to 0: give at least one positive share")
        unsupported = backend_class(self.backend).unsupported_sampling
        for where, sampling in [*((f"instruction_sampling.{i}", m) for i, m in enumerate(self.instruction_sampling)),
                                ("response_sampling", self.response_sampling)]:
            for key in sorted(unsupported):
                if getattr(sampling, key, None) is not None:
                    raise ValueError(f"{where}.{key}: the {self.backend} backend cannot apply {key} (the "
                                     "transformers backend can); remove it")
        prompts = self.all_category_prompts
        for cname, cfg in self.configs.items():
            if not _NAME_RE.match(cname):
                raise ValueError(f"config name {cname!r}: use letters, digits, '_', '-', '.' (it becomes a directory)")
            for cat in ([cfg.category] if cfg.category else []) + list(cfg.categories or {}):
                if cat not in prompts:
                    raise ValueError(f"config {cname!r}: unknown category {cat!r}; define it under category_prompts "
                                     f"or use one of: {', '.join(sorted(prompts))}")
        return self

    @property
    def all_category_prompts(self) -> dict[str, str]:
        return {**BUILTIN_CATEGORY_PROMPTS, **self.category_prompts}

    def fingerprint(self, config: str) -> str:
        """Hash of everything the rows of ``config`` depend on (not backend, concurrency, tags, card)."""
        return hashlib.sha256(json.dumps(self.generation_settings(config), sort_keys=True).encode()).hexdigest()

    def generation_settings(self, config: str) -> dict:
        """Everything the rows depend on. Not ``max_replacements``: raising it only lets a stopped build
        finish (each row's chain of replacements is fixed), so a resume with a higher value is allowed."""
        cfg = self.configs[config]
        prompts = self.all_category_prompts
        cats = {cfg.category: 1.0} if cfg.category else (cfg.categories or {})
        return {
            "model": self.model, "revision": self.revision, "seed": self.seed, "config": config,
            "rows": cfg.rows, "turns": cfg.turns, "system_prompt": cfg.system_prompt,
            "categories": {k: [v, prompts[k]] for k, v in sorted(cats.items())},
            "instruction_sampling": [m.model_dump(exclude_none=True) for m in self.instruction_sampling],
            "response_sampling": self.response_sampling.model_dump(exclude_none=True),
            "max_new_tokens": self.max_new_tokens.model_dump(), "cleanup": self.cleanup.model_dump(),
            "truncation": self.truncation.model_dump(), "max_attempts": self.max_attempts,
            "multi_turn_system_prompt": self.multi_turn_system_prompt if cfg.turns > 1 else None,
        }

    def plan(self, config: str) -> ConfigPlan:
        if config not in self.configs:
            raise RecipeError(f"unknown config {config!r}; the recipe defines: {', '.join(self.configs)}")
        return ConfigPlan(self, config)

    def select(self, names: list[str] | None) -> list[str]:
        """The config names to build, in recipe order; RecipeError for unknown names."""
        if not names:
            return list(self.configs)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise RecipeError(f"unknown config {unknown[0]!r} (--config); the recipe defines: {', '.join(self.configs)}")
        return [n for n in self.configs if n in set(names)]


@dataclass(frozen=True)
class RowPlan:
    index: int
    uuid: str
    mix: SamplingMix
    category: str | None
    system_prompt: str | None
    replacement: int = 0


def exact_counts(weights: list[float], total: int) -> list[int]:
    """Split ``total`` by normalised ``weights`` into integers summing to ``total`` (largest remainder)."""
    norm = sum(weights)
    quotas = [w / norm * total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _assignment(weights: list[float], total: int, key: str) -> list[int]:
    slots = [k for k, n in enumerate(exact_counts(weights, total)) for _ in range(n)]
    random.Random(key).shuffle(slots)
    return slots


class ConfigPlan:
    """Row index -> (uuid, sampling mix, category): deterministic from the recipe, seed, config and index."""

    def __init__(self, recipe: Recipe, config: str):
        self.recipe, self.config = recipe, config
        self.cfg = recipe.configs[config]
        self.rows = self.cfg.rows

    @cached_property
    def _mixes(self) -> list[int]:
        shares = [m.share for m in self.recipe.instruction_sampling]
        return _assignment(shares, self.rows, f"{self.recipe.seed}/{self.config}/sampling")

    @cached_property
    def _categories(self) -> list[str] | None:
        if not self.cfg.categories:
            return None
        names = list(self.cfg.categories)
        slots = _assignment([self.cfg.categories[n] for n in names], self.rows, f"{self.recipe.seed}/{self.config}/categories")
        return [names[k] for k in slots]

    def uuid(self, index: int, replacement: int = 0) -> str:
        """Row ``index``'s uuid; its ``replacement``-th replacement (k >= 1) has its own."""
        key = f"{self.recipe.seed}/{self.config}/{index}" + (f"/replacement-{replacement}" if replacement else "")
        return str(uuid_lib.uuid5(UUID_NAMESPACE, key))

    def row(self, index: int, replacement: int = 0) -> RowPlan:
        """Row ``index``; with ``replacement`` k >= 1, the spec that replaces it after k exhausted ones: the
        same sampling mix and category (the exact counts hold), a new uuid (so new request seeds)."""
        if not 0 <= index < self.rows:
            raise IndexError(index)
        category = self.cfg.category or (self._categories[index] if self._categories else None)
        system = self.cfg.system_prompt
        if category is not None:
            system = self.recipe.all_category_prompts[category]
        mix = self.recipe.instruction_sampling[self._mixes[index]]
        return RowPlan(index, self.uuid(index, replacement), mix, category, system, replacement)


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        where, _, key = loc.rpartition(".")
        return f"unknown key {key!r}" + (f" in {where}" if where else "") + " (check the spelling; see builders/demo.yaml)"
    if kind == "missing":
        return f"missing required key {loc!r}"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def apply_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """Apply command-line overrides (rows, model, backend, endpoint) to raw recipe data.

    ``backend`` replacing the recipe's backend keeps only the ``backend_options`` the new backend accepts
    (the others belong to the recipe's backend); ``endpoint`` sets ``backend_options.endpoint``."""
    data = dict(data)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "model" in ov and ov["model"] != data.get("model"):
        data["model"] = ov["model"]
        data.pop("revision", None)   # the recipe's revision belongs to its own model
    if "backend" in ov and ov["backend"] != data.get("backend", Recipe.model_fields["backend"].default):
        opts = data.get("backend_options")
        if isinstance(opts, dict) and opts:
            accepted = set(option_keys(ov["backend"]))
            data["backend_options"] = {k: v for k, v in opts.items() if k in accepted}
        data["backend"] = ov["backend"]
    if "endpoint" in ov:
        backend = data.get("backend", Recipe.model_fields["backend"].default)
        if isinstance(backend, str) and "endpoint" not in option_keys(backend):
            servers = [name for name in BACKENDS if "endpoint" in option_keys(name)]
            raise RecipeError(f"--endpoint is for the server backends ({', '.join(servers)}); the {backend} "
                              "backend takes no endpoint")
        opts = data.get("backend_options") or {}
        data["backend_options"] = {**(opts if isinstance(opts, dict) else {}), "endpoint": ov["endpoint"]}
    if "rows" in ov:
        if isinstance(ov["rows"], bool) or not isinstance(ov["rows"], int) or ov["rows"] <= 0:
            raise RecipeError(f"--rows must be a positive integer (got {ov['rows']})")
        configs = data.get("configs")
        if isinstance(configs, dict):
            data["configs"] = {k: {**v, "rows": ov["rows"]} if isinstance(v, dict) else v for k, v in configs.items()}
    return data


def parse_recipe(data: Any, *, source: str = "recipe", overrides: Mapping[str, Any] | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the top level must be a mapping of keys (name, model, configs, ...)")
    data = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_describe(exc.errors()[0])}") from None


def load_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe YAML; ``overrides`` = {rows, model, backend, endpoint} (None = keep)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found (see builders/ for examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    return parse_recipe(data, source=str(path), overrides=overrides)
