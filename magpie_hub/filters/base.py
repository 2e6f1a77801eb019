"""The filter-rule interface: one rule = one boolean keep-mask over a config's Arrow table.

A filter recipe is an ordered list of rules (see :mod:`magpie_hub.filters.rules` for the kinds and
:mod:`magpie_hub.filters.presets` for the YAML). Each rule names the columns it reads; a column that a
dataset lacks is reported with the tag step that produces it (the column registry, :mod:`magpie_hub.tags`),
before anything is written.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from magpie_hub.tags import registered_columns, step_for


def ordinal_scales() -> dict[str, tuple[str, ...]]:
    """Ordered label scales of the registered tag columns (:mod:`magpie_hub.tags`), lowest first:
    comparisons like ``input_quality >= average`` compare ranks on them."""
    return {c.name: c.labels for c in registered_columns().values() if c.ordinal}


def how_to_get(column: str) -> str:
    """The fix for a rule on a column the dataset lacks: the registry's hint, else the step that writes it."""
    declared = registered_columns().get(column)
    if declared is not None and declared.hint:
        return declared.hint
    step = step_for(column)
    return f"run `magpie-hub tag DIR --step {step}` first" if step else "use a column the dataset has"


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

    @classmethod
    @abc.abstractmethod
    def parse(cls, spec: Any) -> FilterRule | None:
        """This kind's rule from one entry of a filter YAML's ``rules:`` list (RecipeError when it is this
        kind's form with bad values); None when ``spec`` is another kind's form."""

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
