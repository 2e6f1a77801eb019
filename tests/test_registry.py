"""The registries: a tag step entry (the column registry) drives the tag runner, the filters, the card
statistics and `magpie-hub diff`; a filter rule class + its registry line is a new rule kind. No other
file is touched."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dataset_factory import make_dataset
from datasets import Features, Value

from magpie_hub.card.stats import compute_stats
from magpie_hub.errors import DatasetDirError, RecipeError
from magpie_hub.filters.apply import apply_spec
from magpie_hub.filters.base import FilterRule
from magpie_hub.filters.presets import parse_spec
from magpie_hub.filters.rules import RULES, CompareRule, parse_rule
from magpie_hub.hub.versions import ParquetReader, distribution_columns
from magpie_hub.tags import STEPS, Column, Step, registered_columns, step_for
from magpie_hub.tags.base import TagStep
from magpie_hub.tags.runner import tag_dataset

MOODS = ("sad", "ok", "happy")


class MoodStep(TagStep):
    """A made-up step: a three-level ordinal label and a score per row."""

    name = "mood"

    def run(self, batch):
        moods = [MOODS[len(t or "") % 3] for t in batch["instruction"]]
        return {"mood": moods, "mood_score": [float(MOODS.index(m)) for m in moods]}


MOOD = Step(f"{__name__}:MoodStep", (
    Column("mood", labels=MOODS, ordinal=True, card=35, diff=True),   # between input_quality and language
    Column("mood_score", "float64", card=75),
))


@pytest.fixture
def mood(monkeypatch):
    monkeypatch.setitem(STEPS, "mood", MOOD)


def test_unregistered_column_is_unknown():
    assert step_for("mood") is None and "mood" not in registered_columns() and "mood" not in distribution_columns()
    with pytest.raises(RecipeError, match="needs a number"):
        parse_rule("mood >= ok")


def test_one_registry_entry_drives_every_consumer(mood, tmp_path):
    d = make_dataset(tmp_path / "ds", tagged=True, sizes={"single_turn": 30, "multi_turn": 12})

    # filters: the ordinal scale, and the step to run when the column is missing
    rule = parse_rule("mood >= ok")
    assert isinstance(rule, CompareRule) and rule.scale == MOODS
    spec = parse_spec("rules: ['mood >= ok', 'mood in [Happy]']", default_name="t", source="t")
    with pytest.raises(DatasetDirError, match=r"column 'mood'.*magpie-hub tag DIR --step mood"):
        apply_spec(spec, {"single_turn": pa.table({"instruction": ["x"]})})

    # the runner: features derived from the entry, columns written
    result = tag_dataset(d, ["mood"])
    assert result["ran"] == ["mood"]
    shard = sorted((d / "single_turn").glob("train-*.parquet"))[0]
    assert Features.from_arrow_schema(pq.read_schema(shard))["mood_score"] == Value("float64")
    table = pa.concat_tables(pq.read_table(p) for p in sorted((d / "single_turn").glob("train-*.parquet")))
    kept, report = apply_spec(spec, {"single_turn": table})
    moods = table.column("mood").to_pylist()
    assert kept["single_turn"].num_rows == moods.count("happy") < report.rows_in["single_turn"]

    # card statistics: the distribution in scale order, at its card position; the number summary
    stats = compute_stats(d)["configs"]["single_turn"]
    dists = stats["distributions"]
    assert list(dists) == ["task_category", "difficulty", "input_quality", "mood", "language"]
    assert list(dists["mood"]["counts"]) == [m for m in MOODS if m in moods]
    assert dists["mood"]["counts"] == {m: moods.count(m) for m in MOODS if m in moods}
    assert stats["mood_score"]["max"] == max(MOODS.index(m) for m in moods)

    # magpie-hub diff: the shift of the distribution is reported
    assert "mood" in distribution_columns()
    reader = ParquetReader.__new__(ParquetReader)
    reader.repo, reader.commit = "org/local", "0" * 40
    reader._open = lambda path: open(path, "rb")  # noqa: SIM115 - closed by the reader's `with`
    paths = [str(p) for p in sorted((d / "single_turn").glob("train-*.parquet"))]
    summary = reader.summarize(paths, distributions=True)
    assert summary.distributions["mood"] == {m: moods.count(m) for m in MOODS if m in moods}


class EvenRule(FilterRule):
    """``even COLUMN``: keep rows whose integer column is even."""

    kind = "even"

    def __init__(self, column: str):
        self.column = column

    @classmethod
    def parse(cls, spec):
        if isinstance(spec, str) and spec.startswith("even "):
            return cls(spec.split()[1])
        return None

    @property
    def columns(self):
        return (self.column,)

    def describe(self):
        return f"even {self.column}"

    def keep_mask(self, table):
        return pc.equal(pc.bit_wise_and(table.column(self.column), 1), 0).combine_chunks(), 0


def test_a_filter_rule_is_one_class_and_one_registry_line(monkeypatch):
    with pytest.raises(RecipeError, match="not understood"):
        parse_rule("even turns")
    monkeypatch.setitem(RULES, EvenRule.kind, EvenRule)
    spec = parse_spec("rules: [even turns, 'turns < 4']", default_name="t", source="t")
    kept, report = apply_spec(spec, {"c": pa.table({"turns": [1, 2, 3, 4, 6]})})
    assert kept["c"].column("turns").to_pylist() == [2] and report.to_dict()["steps"][0]["rule"] == "even turns"
