"""What later stages know about a column, declared once with the tag step that writes it.

Dependency-free on purpose: the step registry (:mod:`magpie_hub.tags`) declares every step's columns with
these types, and the consumers read them without importing a step, ``datasets`` or torch — filters
(ordered label scales, which step writes a column), the card statistics (label distributions and number
summaries, in the card's order), ``magpie-hub diff`` (distribution shifts). The judges' label sets live
here too: the judge prompts and the ``labels`` of their columns are the same tuples.
"""

from __future__ import annotations

from dataclasses import dataclass

NUMERIC_DTYPES = ("int", "uint", "float")

# The official MAGPIE task categories (label -> what the judge is told it means).
TASK_CATEGORIES: dict[str, str] = {
    "Information seeking": "the user asks for facts or information about a topic",
    "Reasoning": "the query needs logical thinking, problem solving or working through complex ideas",
    "Planning": "the user wants help making a plan or a strategy for an activity or a project",
    "Editing": "the user wants written text edited, rephrased, proofread or otherwise reworked",
    "Coding & Debugging": "the user wants code written, reviewed, explained or fixed",
    "Math": "the query is about mathematical concepts, problems or calculations",
    "Role playing": "the user asks the assistant to take on a character or persona in a scenario",
    "Data analysis": "the user wants data or statistics interpreted, or an analytical task done",
    "Creative writing": "the user wants a story, poem or other creative text written",
    "Advice seeking": "the user asks for recommendations or guidance on a personal or professional matter",
    "Brainstorming": "the user wants ideas generated or possibilities explored",
    "Others": "the query fits none of the categories above",
}
# Ordered label scales (magpie-method.md), lowest first.
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
QUALITIES = ("very poor", "poor", "average", "good", "excellent")


@dataclass(frozen=True)
class Column:
    """One output column and the facts other stages act on.

    ``card`` orders the card's statistics (and so ``magpie_stats.json`` and the plots): text columns get
    a label distribution (counts per label, ordinal scales in scale order, others by count), numeric ones a
    mean/median/p90 summary; ``None`` = not summarised. ``hint`` marks a column that a plain
    ``--step NAME`` run does not write, and says how to get it (the filter's missing-column error)."""

    name: str
    dtype: str = "string"             # a ``datasets.Value`` dtype, or ``list[<dtype>]``
    labels: tuple[str, ...] = ()      # the closed label set of a judge column (scale order when ordinal)
    ordinal: bool = False             # labels are ordered: filters compare on the scale (``>= good``)
    card: int | None = None           # position in the card's statistics; None = not summarised
    diff: bool = False                # ``magpie-hub diff`` reports the shift of its distribution
    hint: str | None = None           # written only on request: how to request it

    @property
    def numeric(self) -> bool:
        return self.dtype.startswith(NUMERIC_DTYPES)


@dataclass(frozen=True)
class Step:
    """A registry entry: where the step class lives (``"module:Class"``) and the columns it adds, in order."""

    target: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)
