"""Mix targets of a config (recipe ``configs.NAME.mix``): the share of rows per task category and/or
difficulty that the closed-loop build (:mod:`magpie_hub.build.mix`) must deliver.

::

    mix:
      task_category: {Math: 0.3, Coding & Debugging: 0.2, rest: 0.5}   # official labels, "rest" = all others
      difficulty: {easy: 0.4, medium: 0.4, rest: 0.2}      # rest = the remainder
      joint: false          # true: buckets are (category, difficulty) pairs with product shares
      tolerance: 0.02       # +-2 points; must be >= half a row's share (1 / 2N)
      budget: {max_generated_rows: 600}          # or {max_tokens_per_row: 900}
      classifier: embedding                      # or judge (any backend, as the judge tag steps)
      classifier_options: {}                     # judge: {model, backend, backend_options, ...}
      steer: {wave: 16, temperatures: [0.9, 1.1]}
      mode: closed_loop     # natural / blind: open-loop baselines (every row accepted, mix only measured)

Shares are checked here (sum to 1 within 1e-6 unless ``rest`` takes the remainder); label NAMES are checked
against the official label sets by the classifier when the pipeline builds it (the label facts live with
the tags, a later stage). Targets become exact row counts per bucket (:func:`bucket_targets`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from magpie_hub.recipe.plan import exact_counts

REST = "rest"
DIMENSIONS = ("task_category", "difficulty")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MixBudget(_Strict):
    """When to give up on filling the buckets: candidates generated, or generated tokens per target row."""

    max_generated_rows: int | None = Field(None, gt=0)
    max_tokens_per_row: float | None = Field(None, gt=0)


class SteerOptions(_Strict):
    """How the loop steers generation toward unfilled buckets (see :mod:`magpie_hub.build.steer`)."""

    category_prompts: bool = True       # category system prompts (official + shipped steering prompts)
    difficulty_prompts: bool = True     # difficulty sentences appended to the system prompt
    temperatures: list[float] | None = None   # instruction temperatures to choose from (default: the recipe's)
    wave: int = Field(16, ge=1, le=4096)      # candidates per wave: steering is decided between waves
    exploration: float = Field(0.5, ge=0.0, le=10.0)   # UCB bonus weight (0 = pure exploitation)

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not 0.0 <= t <= 10.0 for t in value)):
            raise ValueError("steer.temperatures: give a non-empty list of temperatures in [0, 10]")
        return value


class MixTarget(_Strict):
    task_category: dict[str, float] | None = None
    difficulty: dict[str, float] | None = None
    joint: bool = False
    tolerance: float = Field(0.02, gt=0.0, lt=1.0)
    budget: MixBudget = Field(default_factory=MixBudget)
    classifier: Literal["embedding", "judge"] = "embedding"
    classifier_options: dict[str, Any] = Field(default_factory=dict)
    steer: SteerOptions = Field(default_factory=SteerOptions)
    mode: Literal["closed_loop", "natural", "blind"] = "closed_loop"

    @model_validator(mode="after")
    def _shares(self) -> MixTarget:
        given = [d for d in DIMENSIONS if getattr(self, d) is not None]
        if not given:
            raise ValueError("mix: give task_category and/or difficulty shares, e.g. mix: {task_category: "
                             "{Math: 0.5, rest: 0.5}}")
        for dim in given:
            shares = getattr(self, dim)
            if not shares:
                raise ValueError(f"mix.{dim} is empty: give {{label: share, ..., rest: share}}")
            for label, share in shares.items():
                if not math.isfinite(share) or share < 0:
                    raise ValueError(f"mix.{dim}.{label}: share must be >= 0 (got {share})")
            total = sum(shares.values())
            if REST not in shares and abs(total - 1.0) > 1e-6:
                raise ValueError(f"mix.{dim}: shares sum to {total:g}, not 1; fix them or add `rest: "
                                 f"{max(0.0, 1 - total):g}` for all other labels")
            named = sum(v for k, v in shares.items() if k != REST)
            if REST in shares and named > 1.0 + 1e-6:
                raise ValueError(f"mix.{dim}: the named shares sum to {named:g} > 1; lower them (rest takes "
                                 "the remainder)")
        if self.joint and len(given) < 2:
            raise ValueError("mix.joint needs both task_category and difficulty shares")
        return self

    def check_rows(self, rows: int) -> None:
        """A tolerance below half a row's share cannot be promised on ``rows`` rows (ValueError)."""
        granularity = 1.0 / rows
        if self.tolerance + 1e-12 < granularity / 2:
            raise ValueError(f"mix.tolerance {self.tolerance:g} is finer than {rows} rows allow (one row = "
                             f"{granularity:.3g} of the config, so +-{granularity / 2:.3g} at best); use tolerance >= "
                             f"{granularity / 2:.3g} or rows >= {math.ceil(1 / (2 * self.tolerance))}")

    def dims(self) -> dict[str, dict[str, float]]:
        """The target dimensions given: {dimension: {label or rest: share}}."""
        return {d: dict(getattr(self, d)) for d in DIMENSIONS if getattr(self, d) is not None}

    def settings(self) -> dict[str, Any]:
        """What the rows depend on (fingerprint); not the budget (raising it only lets a build finish)."""
        return self.model_dump(mode="json", exclude={"budget"})


def normalised(shares: dict[str, float]) -> dict[str, float]:
    """{label or rest: share}: ``rest`` takes the remainder 1 - sum(named shares) (its written value is
    only a reminder); labels outside the shares without a rest get no row."""
    out = {k: v for k, v in shares.items() if k != REST}
    if REST in shares:
        out[REST] = max(0.0, 1.0 - sum(out.values()))
    return out


def bucket_key(mix: MixTarget, labels: dict[str, str | None], known: dict[str, tuple[str, ...]]) -> tuple:
    """A row's bucket per dimension: its label, ``rest`` when the label is not named, None when unlabelled."""
    key = []
    for dim, shares in mix.dims().items():
        label = labels.get(dim)
        if label is None or label not in known.get(dim, (label,)):
            key.append(None)
        else:
            key.append(label if label in shares else (REST if REST in shares else label))
    return tuple(key)


def bucket_targets(mix: MixTarget, rows: int) -> list[dict[tuple, int]]:
    """Exact row counts per bucket (largest remainder), one table per constraint: joint -> one table of
    (category, difficulty) pairs with product shares; else one table per dimension (keys are 1-tuples
    padded to the dimension's position, so every table keys on the full bucket tuple's coordinates)."""
    dims = mix.dims()
    norm = {d: normalised(s) for d, s in dims.items()}
    names = list(dims)
    if mix.joint:
        pairs = [(a, b) for a in norm[names[0]] for b in norm[names[1]]]
        counts = exact_counts([norm[names[0]][a] * norm[names[1]][b] for a, b in pairs], rows)
        return [{p: n for p, n in zip(pairs, counts, strict=True)}]
    tables = []
    for pos, dim in enumerate(names):
        labels = list(norm[dim])
        counts = exact_counts([norm[dim][k] for k in labels], rows)
        tables.append({tuple(k if i == pos else "*" for i in range(len(names))): n
                       for k, n in zip(labels, counts, strict=True)})
    return tables


__all__ = ["DIMENSIONS", "REST", "MixBudget", "MixTarget", "SteerOptions", "bucket_key", "bucket_targets",
           "normalised"]
