"""Tag steps: the registry that maps a step name (``magpie-hub tag --step NAME``, recipe ``tags:``) to its
:class:`~magpie_hub.tags.base.TagStep` class and the columns it adds — the one column registry.

Filters (ordered label scales, the step that writes a missing column), the card statistics and
``magpie-hub diff`` read the columns from here, so adding a step is one module + one entry in ``STEPS``,
and adding an output column is one :class:`Column` in its step's entry. This module imports no step,
no ``datasets`` and no torch: the Hub commands read it at start.
"""

from __future__ import annotations

import importlib

from magpie_hub.errors import RecipeError
from magpie_hub.tags.columns import DIFFICULTIES, QUALITIES, TASK_CATEGORIES, Column, Step

_BASE_COLUMN = "run the reward tag step with a base-model response column: tags: [{reward: {base_column: COLUMN}}]"

STEPS: dict[str, Step] = {
    "lengths": Step("magpie_hub.tags.lengths:LengthsStep", (
        Column("instruction_length", "int64"), Column("response_length", "int64"),
        Column("instruction_chars", "int64"), Column("response_chars", "int64"))),
    "language": Step("magpie_hub.tags.language:LanguageStep", (
        Column("language", card=40, diff=True),)),
    "dedup": Step("magpie_hub.tags.dedup:DedupStep", (
        Column("min_neighbor_distance", "float64", card=80), Column("repeat_count", "int64"),
        Column("min_similar_uuid"))),
    "task_category": Step("magpie_hub.tags.judge:TaskCategoryStep", (
        Column("task_category", labels=tuple(TASK_CATEGORIES), card=10, diff=True),
        Column("other_task_category", "list[string]"), Column("task_category_generator"))),
    "difficulty": Step("magpie_hub.tags.judge:DifficultyStep", (
        Column("difficulty", labels=DIFFICULTIES, ordinal=True, card=20, diff=True),
        Column("intent"), Column("knowledge"), Column("difficulty_generator"))),
    "quality": Step("magpie_hub.tags.judge:QualityStep", (
        Column("input_quality", labels=QUALITIES, ordinal=True, card=30),
        Column("quality_explanation"), Column("quality_generator"))),
    "reward": Step("magpie_hub.tags.reward:RewardStep", (
        Column("instruct_reward", "float64", card=70), Column("reward_model"),
        Column("base_reward", "float64", hint=_BASE_COLUMN),
        Column("reward_difference", "float64", hint=_BASE_COLUMN))),
    "mix_classify": Step("magpie_hub.tags.mix_classify:MixClassifyStep", (   # the build's mix classifier
        Column("mix_task_category", labels=tuple(TASK_CATEGORIES), card=12, diff=True),
        Column("mix_difficulty", labels=DIFFICULTIES, ordinal=True, card=22, diff=True), Column("mix_classifier"))),
    "safety": Step("magpie_hub.tags.safety:SafetyStep", (
        Column("llama_guard_2"), Column("safety", labels=("safe", "unsafe"), card=60),
        Column("safety_generator"))),
}

# Columns the build writes (magpie_hub.dataset.schema) that the card / diff summarise like tag columns.
BUILD_COLUMNS: tuple[Column, ...] = (Column("category", card=50, diff=True), Column("turns", "int64", card=90))

# Run when neither --step nor the recipe's ``tags:`` names steps (judge steps only when named).
DEFAULT_STEPS: tuple[str, ...] = ("lengths", "language", "dedup")


def registered(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise RecipeError(f"unknown tag step {name!r}; choose from: {', '.join(STEPS)}") from None


def step_class(name: str) -> type:
    """The :class:`~magpie_hub.tags.base.TagStep` subclass registered as ``name`` (its module is imported now)."""
    module_name, _, attr = registered(name).target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def registered_columns() -> dict[str, Column]:
    """Every declared column by name: the build's, then each step's in registry order."""
    return {c.name: c for c in (*BUILD_COLUMNS, *(c for s in STEPS.values() for c in s.columns))}


def step_for(column: str) -> str | None:
    """The tag step that writes ``column`` (None for generation columns and unknown ones)."""
    return next((name for name, step in STEPS.items() if column in step.names), None)


__all__ = ["BUILD_COLUMNS", "DEFAULT_STEPS", "STEPS", "Column", "Step", "registered", "registered_columns",
           "step_class", "step_for"]
