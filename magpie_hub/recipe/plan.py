"""The row plan: index -> (uuid, sampling mix, category, system prompt), deterministic from the recipe.

Mix shares and category weights are normalised (no exact-sum trap) and turned into exact counts (largest
remainder), spread over the indices by a seeded shuffle, so a config of N rows holds each mix
``round(N * share)`` times.
"""

from __future__ import annotations

import math
import random
import uuid as uuid_lib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from magpie_hub.recipe.prompts import UUID_NAMESPACE


@dataclass(frozen=True)
class RowPlan:
    index: int
    uuid: str
    mix: Any   # recipe.schema.SamplingMix (not imported: the schema imports this module)
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

    def __init__(self, recipe: Any, config: str):
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
