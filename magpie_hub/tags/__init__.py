"""Tag steps: the registry that maps a step name (``magpie-hub tag --step NAME``, recipe ``tags:``)
to its :class:`~magpie_hub.tags.base.TagStep` class. Adding a step = one module + one line here."""

from __future__ import annotations

import importlib

from magpie_hub.errors import RecipeError
from magpie_hub.tags.base import TagContext, TagStep

STEPS: dict[str, str] = {
    "lengths": "magpie_hub.tags.lengths:LengthsStep",
    "language": "magpie_hub.tags.language:LanguageStep",
    "dedup": "magpie_hub.tags.dedup:DedupStep",
    "task_category": "magpie_hub.tags.judge:TaskCategoryStep",
    "difficulty": "magpie_hub.tags.judge:DifficultyStep",
    "quality": "magpie_hub.tags.judge:QualityStep",
    "reward": "magpie_hub.tags.reward:RewardStep",
    "safety": "magpie_hub.tags.safety:SafetyStep",
}

# Run when neither --step nor the recipe's ``tags:`` names steps (judge steps only when named).
DEFAULT_STEPS: tuple[str, ...] = ("lengths", "language", "dedup")


def step_class(name: str) -> type[TagStep]:
    try:
        module_name, _, attr = STEPS[name].partition(":")
    except KeyError:
        raise RecipeError(f"unknown tag step {name!r}; choose from: {', '.join(STEPS)}") from None
    return getattr(importlib.import_module(module_name), attr)


__all__ = ["DEFAULT_STEPS", "STEPS", "TagContext", "TagStep", "step_class"]
