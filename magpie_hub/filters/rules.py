"""The filter rule kinds: one class each, registered in ``RULES`` (kind -> class); each parses its own forms.

Forms accepted in a filter YAML's ``rules:`` list (applied in order; keep-longest-N always last):

- ``"input_quality >= average"`` — comparison (``> >= < <= == !=``); judge labels compare on their
  ordered scale (``very poor < poor < average < good < excellent``), numbers numerically, booleans with
  ``==`` / ``!=`` (``truncated == false``: rows with no turn cut at max_new_tokens or at a loop);
- ``'instruction not endswith ":"'`` — ``startswith`` / ``endswith`` / ``contains``, optionally ``not``;
- ``"language in [en, de]"`` — membership, optionally ``not in``;
- ``"dedup"`` or ``{dedup: true}`` — near-duplicate removal keeping the first row of each group
  (rows whose ``min_similar_uuid`` is null or their own ``uuid``; the official definition);
- ``"keep_longest 300000"`` or ``{keep_longest: {n: 300000, by: response_chars}}`` (the paper and the official
  notebook sort by characters; the default ``by`` is ``response_length``, tokens);
- ``{balance: {by: difficulty, shares: {"<= easy": 0.5, ">= medium": 0.5}}}`` — strata for the
  ``keep_longest`` that follows (:mod:`magpie_hub.filters.balance`);
- the long form ``{column: instruct_reward, op: ">", value: -12}``.

Null values (untagged rows, unparseable judge answers) never pass a comparison: they are removed and
counted separately in the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from magpie_hub.errors import RecipeError
from magpie_hub.filters.balance import BalanceRule
from magpie_hub.filters.base import FilterRule, ordinal_scales

_SYMBOL_OPS = {">": "greater", ">=": "greater_equal", "<": "less", "<=": "less_equal",
               "==": "equal", "!=": "not_equal"}
_MATCH_OPS = {"startswith": "starts_with", "endswith": "ends_with", "contains": "match_substring"}

_LONGEST_RE = re.compile(r"^\s*keep_longest\s+(?P<n>\d+)(?:\s+by\s+(?P<by>[A-Za-z_]\w*))?\s*$")


def _scalar(table: pa.Table, column: str, rule: FilterRule) -> pa.ChunkedArray:
    """The column's values; a nested column (list, struct) cannot be compared: a one-line error."""
    values = table.column(column)
    if pa.types.is_nested(values.type):
        raise RecipeError(f"filter rule '{rule.describe()}': column {column} holds {values.type} values; rules "
                          "compare single values (text, numbers, labels)")
    return values


def _parse_value(text: str, rule: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise RecipeError(f"filter rule '{rule}': cannot read the value {text!r}; quote strings, e.g. "
                          "instruction not endswith \":\"") from None


@lru_cache(maxsize=8)
def _form_patterns(operators: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """``COLUMN [not] WORD VALUE`` and ``COLUMN SYMBOL VALUE`` for the registered operators."""
    def alternatives(ops: list[str]) -> str:
        return "|".join(re.escape(op) for op in sorted(ops, key=len, reverse=True))  # ">=" before ">"

    words = alternatives([op for op in operators if op.isidentifier()])
    symbols = alternatives([op for op in operators if not op.isidentifier()])
    return (re.compile(rf"^\s*(?P<col>[A-Za-z_]\w*)\s+(?P<neg>not\s+)?(?P<op>{words})\s+(?P<val>.+?)\s*$"),
            re.compile(rf"^\s*(?P<col>[A-Za-z_]\w*)\s*(?P<op>{symbols})\s*(?P<val>.+?)\s*$"))


@dataclass(frozen=True)
class ColumnForm:
    """The parts of a column rule: ``COLUMN [not] OP VALUE`` (a string) or ``{column, op, value}``."""

    column: str
    op: str
    value: Any
    negate: bool
    text: str

    @classmethod
    def of(cls, spec: Any) -> ColumnForm | None:
        """The parts of ``spec``, None when it is not a column rule's form (string forms: with one of the
        operators of the registered column rules)."""
        if isinstance(spec, str):
            text = spec.strip()
            word_re, symbol_re = _form_patterns(column_operators())
            if m := word_re.match(text):
                column, op = m["col"], ("not " if m["neg"] else "") + m["op"]
            elif m := symbol_re.match(text):
                column, op = m["col"], m["op"]
            else:
                return None
            value = _parse_value(m["val"], text)
        elif isinstance(spec, dict) and set(spec) == {"column", "op", "value"} and isinstance(spec["column"], str):
            column, op, value, text = spec["column"], spec["op"], spec["value"], str(spec)
        else:
            return None
        op = " ".join(str(op).split())
        negate = op.startswith("not ")
        return cls(column, op[4:] if negate else op, value, negate, text)


class ColumnRule(FilterRule):
    """A rule on one column, written ``COLUMN [not] OP VALUE`` or ``{column: C, op: OP, value: V}``;
    a subclass names its ``operators`` and builds itself from the parsed form."""

    operators: ClassVar[tuple[str, ...]]
    negatable: ClassVar[bool] = True     # may follow ``not``
    column: str

    @classmethod
    def parse(cls, spec: Any) -> ColumnRule | None:
        form = ColumnForm.of(spec)
        if form is None or form.op not in cls.operators or (form.negate and not cls.negatable):
            return None
        return cls.from_form(form)

    @classmethod
    def from_form(cls, form: ColumnForm) -> ColumnRule:
        raise NotImplementedError(f"filter rule kind {cls.kind!r} must implement from_form()")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


def _finish(result: pa.Array | pa.ChunkedArray) -> tuple[pa.BooleanArray, int]:
    """Nulls in a comparison result mean "unknown": removed, and counted."""
    nulls = int(result.null_count)
    mask = pc.fill_null(result, False)
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    return mask, nulls


class CompareRule(ColumnRule):
    """``COLUMN OP VALUE`` on a numeric column, an ordered-label column, or (== / !=) a string or boolean
    column."""

    kind = "compare"
    operators = tuple(_SYMBOL_OPS)
    negatable = False

    def __init__(self, column: str, op: str, value: Any):
        if op not in _SYMBOL_OPS:
            raise RecipeError(f"filter rule on {column!r}: unknown operator {op!r}; use one of "
                              f"{' '.join(_SYMBOL_OPS)}")
        self.column, self.op, self.value = column, op, value
        scales = ordinal_scales()
        self.scale = scales.get(column)
        if self.scale is not None:
            label = str(value).strip().lower()
            if label not in self.scale:
                raise RecipeError(f"filter rule '{self.describe()}': {value!r} is not a {column} label; use one "
                                  f"of: {', '.join(self.scale)}")
            self.rank = self.scale.index(label)
        elif isinstance(value, bool):
            if op not in ("==", "!="):
                raise RecipeError(f"filter rule '{self.describe()}': compare a boolean with == or !=")
        elif not isinstance(value, (int, float, str)):
            raise RecipeError(f"filter rule '{self.describe()}': compare with a number, a string or true/false")
        elif isinstance(value, str) and op not in ("==", "!="):
            raise RecipeError(f"filter rule '{self.describe()}': {op} needs a number (or an ordered label of "
                              f"{', '.join(scales)})")

    @classmethod
    def from_form(cls, form: ColumnForm) -> CompareRule:
        return cls(form.column, form.op, form.value)

    def describe(self) -> str:
        if isinstance(self.value, bool):
            return f"{self.column} {self.op} {str(self.value).lower()}"
        value = self.value if not isinstance(self.value, str) or self.scale else f'"{self.value}"'
        return f"{self.column} {self.op} {value}"

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        values = _scalar(table, self.column, self)
        func = getattr(pc, _SYMBOL_OPS[self.op])
        if self.scale is not None:
            labels = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
            ranks = pc.index_in(labels, value_set=pa.array(self.scale))  # off-scale -> null
            return _finish(func(ranks, pa.scalar(self.rank, pa.int32())))
        if isinstance(self.value, bool):
            if not pa.types.is_boolean(values.type):
                raise RecipeError(f"filter rule '{self.describe()}': column {self.column} is {values.type}, "
                                  "not true/false")
            return _finish(func(values, pa.scalar(self.value)))
        if isinstance(self.value, str):
            if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
                raise RecipeError(f"filter rule '{self.describe()}': column {self.column} is {values.type}, "
                                  "not text; compare it with a number")
            return _finish(func(values, pa.scalar(self.value)))
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            raise RecipeError(f"filter rule '{self.describe()}': column {self.column} is {values.type}, "
                              "not numeric; compare it with a string using == or !=")
        return _finish(func(values, pa.scalar(float(self.value))))


class MatchRule(ColumnRule):
    """``COLUMN [not] startswith|endswith|contains "TEXT"`` (exact, case-sensitive, no trimming)."""

    kind = "match"
    operators = tuple(_MATCH_OPS)

    def __init__(self, column: str, op: str, pattern: Any, negate: bool = False):
        if op not in _MATCH_OPS:
            raise RecipeError(f"filter rule on {column!r}: unknown operator {op!r}; use startswith, endswith "
                              "or contains")
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"filter rule on {column!r}: {op} needs a non-empty quoted string, e.g. "
                              f"{column} not {op} \":\"")
        self.column, self.op, self.pattern, self.negate = column, op, pattern, negate

    @classmethod
    def from_form(cls, form: ColumnForm) -> MatchRule:
        return cls(form.column, form.op, form.value, negate=form.negate)

    def describe(self) -> str:
        return f"{self.column} {'not ' if self.negate else ''}{self.op} {self.pattern!r}"

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        values = _scalar(table, self.column, self)
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise RecipeError(f"filter rule '{self.describe()}': column {self.column} is {values.type}, not text")
        hit = getattr(pc, _MATCH_OPS[self.op])(values, pattern=self.pattern)
        return _finish(pc.invert(hit) if self.negate else hit)


class MembershipRule(ColumnRule):
    """``COLUMN [not] in [A, B, ...]`` (labels of the ordered scales are matched case-insensitively)."""

    kind = "membership"
    operators = ("in",)

    def __init__(self, column: str, values: Any, negate: bool = False):
        if not isinstance(values, list) or not values:
            raise RecipeError(f"filter rule on {column!r}: 'in' needs a non-empty list, e.g. {column} in [a, b]")
        self.column, self.values, self.negate = column, values, negate
        self.fold = column in ordinal_scales()
        if self.fold:
            self.values = [str(v).strip().lower() for v in values]

    @classmethod
    def from_form(cls, form: ColumnForm) -> MembershipRule:
        return cls(form.column, form.value, negate=form.negate)

    def describe(self) -> str:
        return f"{self.column} {'not ' if self.negate else ''}in [{', '.join(map(str, self.values))}]"

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        values = _scalar(table, self.column, self)
        if self.fold:
            values = pc.utf8_lower(pc.utf8_trim_whitespace(values.cast(pa.string())))
        try:
            value_set = pa.array(self.values).cast(values.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise RecipeError(f"filter rule '{self.describe()}': the listed values do not match the type "
                              f"{values.type} of column {self.column}") from None
        hit = pc.is_in(values, value_set=value_set)
        hit = pc.if_else(pc.is_valid(values), hit, pa.scalar(None, pa.bool_()))
        return _finish(pc.invert(hit) if self.negate else hit)


class DedupRule(FilterRule):
    """Near-duplicate removal: keep a row when ``min_similar_uuid`` is null (no near duplicate) or is the
    row's own ``uuid`` (it is the first row of its group); the other group members go."""

    kind = "dedup"

    @classmethod
    def parse(cls, spec: Any) -> DedupRule | None:
        if isinstance(spec, str) and spec.strip() == "dedup":
            return cls()
        if isinstance(spec, dict) and set(spec) == {"dedup"}:
            if spec["dedup"] in (True, None, {}):
                return cls()
            raise RecipeError("filter rule 'dedup' takes no options; write '- dedup'")
        return None

    @property
    def columns(self) -> tuple[str, ...]:
        return ("uuid", "min_similar_uuid")

    def describe(self) -> str:
        return "dedup (first row of each near-duplicate group)"

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        rep = table.column("min_similar_uuid")
        same = pc.equal(rep, table.column("uuid"))
        keep = pc.or_kleene(pc.is_null(rep), same)
        return _finish(keep)


class KeepLongestRule(FilterRule):
    """Keep the ``n`` rows with the largest ``by`` (default ``response_length``), per config; ties keep the
    earlier row; the kept rows stay in their original order. Always applied after the row-wise rules."""

    kind = "keep_longest"
    selection = True

    def __init__(self, n: Any, by: str = "response_length"):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RecipeError(f"filter rule keep_longest: n must be a whole number >= 0, got {n!r}")
        if not isinstance(by, str) or not by:
            raise RecipeError("filter rule keep_longest: 'by' must name a numeric column, e.g. response_chars")
        self.n, self.by = n, by
        self.balance: BalanceRule | None = None   # set by the spec when a balance rule comes just before

    @classmethod
    def parse(cls, spec: Any) -> KeepLongestRule | None:
        if isinstance(spec, str):
            m = _LONGEST_RE.match(spec.strip())
            return cls(int(m["n"]), by=m["by"] or "response_length") if m else None
        if not (isinstance(spec, dict) and set(spec) == {"keep_longest"}):
            return None
        opts = spec["keep_longest"]
        if isinstance(opts, int) and not isinstance(opts, bool):
            return cls(opts)
        if isinstance(opts, dict) and set(opts) <= {"n", "by"} and "n" in opts:
            return cls(opts["n"], by=opts.get("by", "response_length"))
        raise RecipeError("filter rule keep_longest needs {n: N} and optionally {by: COLUMN}")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.by,)

    def describe(self) -> str:
        return f"keep_longest {self.n} by {self.by}" + (f" per {self.balance.by} stratum" if self.balance else "")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "n": self.n, "by": self.by}

    def keep_mask(self, table: pa.Table) -> tuple[pa.BooleanArray, int]:
        column = _scalar(table, self.by, self)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise RecipeError(f"filter rule '{self.describe()}': column {self.by} is {column.type}, not numeric")
        values = pc.fill_null(column.cast(pa.float64()), -np.inf).to_numpy()
        if self.balance is not None:
            mask = self.balance.select(table, values, self.n)
        else:
            order = np.argsort(-values, kind="stable")
            mask = np.zeros(len(values), dtype=bool)
            mask[order[: self.n]] = True
        nulls = int(pc.sum(pc.and_(pc.is_null(column), pa.array(~mask))).as_py() or 0)
        return pa.array(mask), nulls


# kind -> rule class; parse_rule asks them in this order (keywords before column forms).
RULES: dict[str, type[FilterRule]] = {
    rule.kind: rule for rule in (DedupRule, KeepLongestRule, BalanceRule, CompareRule, MatchRule, MembershipRule)
}


def column_operators(*, negatable: bool = False) -> tuple[str, ...]:
    """The operators of the registered column rules (only those that may follow ``not`` if asked)."""
    return tuple(op for rule in RULES.values() if issubclass(rule, ColumnRule)
                 and (rule.negatable or not negatable) for op in rule.operators)


def parse_rule(spec: Any) -> FilterRule:
    """Build a rule from one entry of a filter YAML's ``rules:`` list: the first registered kind that
    recognises the form."""
    for kind in RULES.values():
        rule = kind.parse(spec)
        if rule is not None:
            return rule
    form = ColumnForm.of(spec)
    if form is not None:
        raise RecipeError(f"filter rule '{form.text}': unknown operator {'not ' if form.negate else ''}{form.op}; "
                          f"use {' '.join(column_operators())} ({' '.join(column_operators(negatable=True))} "
                          "may follow 'not')")
    if isinstance(spec, str):
        raise RecipeError(f"filter rule {spec.strip()!r} is not understood; write e.g. 'input_quality >= average', "
                          "'instruction not endswith \":\"', 'dedup' or 'keep_longest 300000'")
    raise RecipeError(f"filter rule {spec!r} is not understood; use a string like 'instruct_reward > -12' or "
                      "{column: C, op: OP, value: V}")
