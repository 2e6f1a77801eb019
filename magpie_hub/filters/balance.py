"""``balance``: stratified selection, so a paper setup like Table 5's Filter6 ("the 200K longest, 50% easy +
50% harder instructions") is expressible::

    rules:
      - input_quality >= good
      - balance: {by: difficulty, shares: {"<= easy": 0.5, ">= medium": 0.5}}
      - keep_longest: {n: 200000, by: response_chars}

``shares`` maps a stratum to its share of what the next ``keep_longest`` keeps (shares are normalised). A
stratum is a value of ``by`` (``easy``), alternatives (``"very easy|easy"``), or on an ordered label scale a
comparison (``"<= easy"``, ``">= medium"``). The balance rule itself removes the rows that fall in no stratum
(null labels included, counted as null); the ``keep_longest`` that follows it keeps, in each stratum, its
share of ``n`` (largest remainders round the quotas to exactly ``n``), the longest rows first. A stratum with
fewer rows than its quota keeps all of them: the result is then smaller than ``n`` and the report says so.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from magpie_hub.errors import RecipeError
from magpie_hub.filters.base import FilterRule, ordinal_scales

_CMP_RE = re.compile(r"^\s*(<=|>=|<|>)\s*(.+?)\s*$")


def _stratum(key: str, scale: tuple[str, ...] | None) -> tuple[str, ...]:
    """The values a shares key stands for."""
    m = _CMP_RE.match(key)
    if m:
        if scale is None:
            raise RecipeError(f"filter rule balance: {key!r} compares, but only ordered label columns "
                              "(difficulty, input_quality) can be compared; list the values instead")
        label = m[2].strip().lower()
        if label not in scale:
            raise RecipeError(f"filter rule balance: {label!r} is not a label of the scale {', '.join(scale)}")
        rank, op = scale.index(label), m[1]
        keep = {"<=": lambda r: r <= rank, "<": lambda r: r < rank, ">=": lambda r: r >= rank,
                ">": lambda r: r > rank}[op]
        return tuple(v for r, v in enumerate(scale) if keep(r))
    values = tuple(v.strip() for v in str(key).split("|") if v.strip())
    if scale is not None:
        values = tuple(v.lower() for v in values)
        unknown = [v for v in values if v not in scale]
        if unknown:
            raise RecipeError(f"filter rule balance: {unknown[0]!r} is not a label of the scale {', '.join(scale)}")
    if not values:
        raise RecipeError("filter rule balance: an empty stratum key; write a value, 'a|b' or '>= medium'")
    return values


class BalanceRule(FilterRule):
    """Strata of ``by`` with target ``shares`` for the ``keep_longest`` that follows (see the module doc)."""

    kind = "balance"
    selection = True

    def __init__(self, by: Any, shares: Any):
        if not isinstance(by, str) or not by:
            raise RecipeError("filter rule balance needs by: COLUMN, e.g. {by: difficulty, shares: {...}}")
        if not isinstance(shares, dict) or not shares:
            raise RecipeError("filter rule balance needs shares: {STRATUM: SHARE, ...}, e.g. "
                              "{'<= easy': 0.5, '>= medium': 0.5}")
        for key, share in shares.items():
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not share >= 0:
                raise RecipeError(f"filter rule balance: the share of {key!r} must be a number >= 0 (got {share!r})")
        if sum(shares.values()) <= 0:
            raise RecipeError("filter rule balance: the shares sum to 0; give at least one positive share")
        self.by, self.scale = by, ordinal_scales().get(by)
        self.shares = {str(k): float(v) for k, v in shares.items()}
        self.strata = {k: _stratum(k, self.scale) for k in self.shares}
        seen: dict[str, str] = {}
        for key, values in self.strata.items():
            for v in values:
                if v in seen:
                    raise RecipeError(f"filter rule balance: {v!r} is in two strata ({seen[v]!r} and {key!r})")
                seen[v] = key

    @classmethod
    def parse(cls, spec: Any) -> BalanceRule | None:
        if not (isinstance(spec, dict) and set(spec) == {"balance"}):
            return None
        opts = spec["balance"]
        if not isinstance(opts, dict) or set(opts) != {"by", "shares"}:
            raise RecipeError("filter rule balance needs exactly {by: COLUMN, shares: {STRATUM: SHARE, ...}}")
        return cls(opts["by"], opts["shares"])

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.by,)

    def describe(self) -> str:
        total = sum(self.shares.values())
        parts = ", ".join(f"{k}: {v / total:.0%}" for k, v in self.shares.items())
        return f"balance by {self.by} ({parts})"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "by": self.by, "shares": self.shares}

    def labels(self, table: pa.Table) -> np.ndarray:
        """Each row's stratum index (-1: in none, or null)."""
        values = table.column(self.by)
        if self.scale is not None:
            values = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
        values = values.to_pylist()
        index = {v: i for i, values_ in enumerate(self.strata.values()) for v in values_}
        return np.array([index.get(v if self.scale is not None or v is None else str(v), -1) for v in values],
                        dtype=np.int64)

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        labels = self.labels(table)
        nulls = int(table.column(self.by).null_count)
        return pa.array(labels >= 0), nulls

    def quotas(self, n: int) -> list[int]:
        """``n`` split by the shares, largest remainders first, summing to exactly ``n``."""
        weights = np.array(list(self.shares.values()), dtype=float)
        exact = n * weights / weights.sum()
        quotas = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - quotas), kind="stable")[: n - int(quotas.sum())]:
            quotas[i] += 1
        return quotas.tolist()

    def select(self, table: pa.Table, values: np.ndarray, n: int) -> np.ndarray:
        """Keep-mask of the largest ``values`` per stratum, each up to its quota of ``n``."""
        labels = self.labels(table)
        mask = np.zeros(len(values), dtype=bool)
        for stratum, quota in enumerate(self.quotas(n)):
            rows = np.flatnonzero(labels == stratum)
            order = rows[np.argsort(-values[rows], kind="stable")]
            mask[order[:quota]] = True
        return mask


__all__ = ["BalanceRule"]
