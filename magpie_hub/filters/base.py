"""The filter-rule interface: one rule = one boolean keep-mask over a config's Arrow table.

A filter recipe is an ordered list of rules (see :mod:`magpie_hub.filters.rules` for the kinds and
:mod:`magpie_hub.filters.presets` for the YAML). Each rule names the columns it reads; a column that a
dataset lacks is reported with the tag step that produces it, before anything is written.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import pyarrow as pa

# Ordered label scales of the judge tags (magpie-method.md): comparisons like ``input_quality >= average``.
ORDINAL_SCALES: dict[str, tuple[str, ...]] = {
    "input_quality": ("very poor", "poor", "average", "good", "excellent"),
    "difficulty": ("very easy", "easy", "medium", "hard", "very hard"),
}

# Which ``magpie-hub tag --step NAME`` produces a column (for the "missing column" error).
COLUMN_STEPS: dict[str, str] = {
    "instruction_length": "lengths",
    "response_length": "lengths",
    "instruction_chars": "lengths",
    "response_chars": "lengths",
    "language": "language",
    "min_neighbor_distance": "dedup",
    "repeat_count": "dedup",
    "min_similar_uuid": "dedup",
    "task_category": "task_category",
    "other_task_category": "task_category",
    "difficulty": "difficulty",
    "intent": "difficulty",
    "knowledge": "difficulty",
    "input_quality": "quality",
    "quality_explanation": "quality",
    "instruct_reward": "reward",
    "base_reward": "reward",
    "reward_difference": "reward",
    "llama_guard_2": "safety",
    "safety": "safety",
}


# Columns a plain ``--step`` run does not write: how to get them instead.
COLUMN_HINTS: dict[str, str] = {
    "base_reward": "run the reward tag step with a base-model response column: "
                   "tags: [{reward: {base_column: COLUMN}}]",
    "reward_difference": "run the reward tag step with a base-model response column: "
                         "tags: [{reward: {base_column: COLUMN}}]",
}


def step_for(column: str) -> str | None:
    """The tag step that writes ``column`` (None for generation columns or unknown ones)."""
    return COLUMN_STEPS.get(column)


@dataclass
class RuleOutcome:
    """What one rule did to one config: rows it saw, rows it removed, and how many of those were
    removed because the column was null (an untagged or unparseable row never passes a comparison)."""

    rows_in: int
    removed: int
    removed_null: int = 0


class FilterRule(abc.ABC):
    """One declarative rule. ``selection`` rules (keep-longest-N) look at the whole remaining table and
    therefore always run after every row-wise rule ("lengths last", as in the paper's Table 5)."""

    kind: str = "rule"
    selection: bool = False

    @property
    @abc.abstractmethod
    def columns(self) -> tuple[str, ...]:
        """Columns this rule reads."""

    @abc.abstractmethod
    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        """Return (mask of rows to keep, number of rows dropped because a needed value was null)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Human-readable one-line form, e.g. ``input_quality >= average`` (report and manifest)."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "rule": self.describe()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
