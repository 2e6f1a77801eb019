"""Build recipes: the YAML files in ``builders/``, validated with pydantic.

A recipe names the model (Hub id, local dir or ``tiny:llama3``), the backend and its options, the
sampling of instructions (a list of ``{temperature, top_p, share}`` mixes, as the paper's Pro/Air tables)
and responses (greedy by default), the clean-up rules and the configs to build. Each config is
single-/multi-turn and optionally steered by one category system prompt or a weighted mix of categories.

Everything a row's content depends on is decided from the recipe, per row index and deterministically:
:meth:`Recipe.plan` (``recipe/plan.py``) gives each index its uuid, sampling mix and category;
``recipe/load.py`` reads the YAML and turns every validation error into one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import backend_class, parse_backend_options
from magpie_hub.layout import is_reserved_config
from magpie_hub.recipe.chat import ChatFields, ConfigChatFields, chat_settings
from magpie_hub.recipe.mix import MixTarget
from magpie_hub.recipe.plan import ConfigPlan
from magpie_hub.recipe.preference import PreferenceOptions
from magpie_hub.recipe.prompts import BUILTIN_CATEGORY_PROMPTS, MULTI_TURN_SYSTEM_PROMPT
from magpie_hub.recipe.source import ReasoningOptions, ResponseModel, SourceRecipe

MAX_ROWS = 10_000_000   # rows of one config: its plan, checkpoint scan and merge stay well within memory
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


class ConfigRecipe(ConfigChatFields, _Strict):   # + pre_query, drop_default_system (recipe/chat.py)
    rows: int = Field(gt=0)
    turns: int = Field(1, ge=1, le=64)
    category: str | None = None
    system_prompt: str | None = None
    categories: dict[str, float] | None = None
    # the Magpie family (recipe/source.py, recipe/preference.py): preference pairs, existing rows, responses
    # from another model
    kind: Literal["sft", "preference"] = "sft"
    preference: PreferenceOptions | None = None
    source: SourceRecipe | None = None
    response_model: ResponseModel | None = None
    mix: MixTarget | None = None   # closed-loop category/difficulty targets (recipe/mix.py, build/mix.py)

    @model_validator(mode="after")
    def _one_steering(self) -> ConfigRecipe:
        if self.kind == "preference" and self.preference is None:
            object.__setattr__(self, "preference", PreferenceOptions())   # frozen: the defaults, once
        if self.kind != "preference" and self.preference is not None:
            raise ValueError("preference: options are for kind: preference configs; add kind: preference")
        if self.kind == "preference" and self.turns != 1:
            raise ValueError("kind: preference configs are single-turn (turns: 1)")
        if self.source is not None and self.source.mode != "answer" and self.kind == "preference":
            raise ValueError(f"source.mode {self.source.mode!r} does not make preference pairs; use mode: answer")
        if self.mix is not None and (self.kind != "sft" or self.source or self.response_model):
            raise ValueError("mix: targets are for plain configs (no kind: preference, source or response_model)")
        given = [k for k in ("category", "system_prompt", "categories", "mix") if getattr(self, k) is not None]
        if self.mix is not None:
            self.mix.check_rows(self.rows)
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


class Recipe(ChatFields, _Strict):   # + pre_query, drop_default_system, template_date, follow_up_sampling
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
    response_model: ResponseModel | None = None   # every config's responses (a config may name its own)
    reasoning: ReasoningOptions = Field(default_factory=ReasoningOptions)
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
            if cfg.mix is not None and self.response_model is not None:
                raise ValueError(f"config {cname!r}: mix targets do not take the recipe's response_model")
            if not _NAME_RE.match(cname):
                raise ValueError(f"config name {cname!r}: use letters, digits, '_', '-', '.' (it becomes a directory)")
            if is_reserved_config(cname):
                raise ValueError(f"config name {cname!r} is reserved by the dataset layout (README.md, the manifest, "
                                 "assets, data, .magpie, ...); rename the config")
            if cfg.rows > MAX_ROWS:
                raise ValueError(f"config {cname!r}: rows {cfg.rows} is more than one build holds ({MAX_ROWS:,}); "
                                 "split it into several configs (or builds into other --out directories)")
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
            **({"mix": cfg.mix.settings()} if cfg.mix is not None else {}),
            **self.family_settings(config),
            **chat_settings(self, config),
        }

    def response_model_for(self, config: str) -> ResponseModel | None:
        """The model writing ``config``'s responses (None: the instruction model itself)."""
        return self.configs[config].response_model or self.response_model

    def family_settings(self, config: str) -> dict:
        """Response model, preference, source and reasoning settings: only when set (older fingerprints hold)."""
        cfg, response = self.configs[config], self.response_model_for(config)
        out = {"kind": cfg.kind} if cfg.kind != "sft" else {}
        for key, value in (("response_model", response), ("preference", cfg.preference), ("source", cfg.source)):
            if value is not None:
                out[key] = value.settings()
        if self.reasoning != ReasoningOptions():
            out["reasoning"] = self.reasoning.model_dump(exclude_none=True)
        return out

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
