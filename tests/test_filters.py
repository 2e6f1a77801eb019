"""Filters: each rule kind, the YAML parser, presets pro/air on a synthetic tagged dir, ordering, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from datasets import Dataset

from magpie_hub import pipeline
from magpie_hub.errors import DatasetDirError, RecipeError
from magpie_hub.filters.apply import apply_spec, filter_dataset
from magpie_hub.filters.presets import load_filter_spec, parse_spec, preset_names
from magpie_hub.filters.rules import (
    DedupRule,
    KeepLongestRule,
    MatchRule,
    MembershipRule,
    parse_rule,
)

QUALITY = ["excellent", "good", "average", "poor", "very poor", None, "Good ", "great"]


def keep(rule, table):
    mask, nulls = rule.keep_mask(table)
    return [i for i, k in enumerate(mask.to_pylist()) if k], nulls


def test_compare_ordinal_scale_case_and_off_label():
    t = pa.table({"input_quality": QUALITY})
    kept, nulls = keep(parse_rule("input_quality >= good"), t)
    assert kept == [0, 1, 6]            # "Good " normalised; "great" is off-scale -> null
    assert nulls == 2
    assert keep(parse_rule("input_quality >= average"), t)[0] == [0, 1, 2, 6]
    assert keep(parse_rule("input_quality < average"), t)[0] == [3, 4]
    assert keep(parse_rule("input_quality == poor"), t)[0] == [3]
    d = pa.table({"difficulty": ["very easy", "easy", "medium", "hard", "very hard"]})
    assert keep(parse_rule("difficulty >= medium"), d)[0] == [2, 3, 4]
    with pytest.raises(RecipeError, match="not a input_quality label"):
        parse_rule("input_quality >= great")


def test_compare_numeric_and_nulls():
    t = pa.table({"instruct_reward": [-20.0, -12.0, -11.9, 3.0, None, float("nan")],
                  "min_neighbor_distance": [0.0, 0.0, 0.1, 0.5, 0.2, 1.0]})
    assert keep(parse_rule("instruct_reward > -12"), t) == ([2, 3], 1)
    assert keep(parse_rule("instruct_reward >= -12"), t)[0] == [1, 2, 3]
    assert keep(parse_rule("min_neighbor_distance>0"), t)[0] == [2, 3, 4, 5]
    assert keep(parse_rule({"column": "instruct_reward", "op": "<=", "value": -12}), t)[0] == [0, 1]
    with pytest.raises(RecipeError, match="needs a number"):
        parse_rule("instruct_reward > high")
    with pytest.raises(RecipeError, match="not numeric"):
        parse_rule("language > 3").keep_mask(pa.table({"language": ["en"]}))


def test_match_and_membership():
    t = pa.table({"instruction": ["List these:", "Why?", "a: b", None], "language": ["en", "de", "EN", None]})
    rule = parse_rule('instruction not endswith ":"')
    assert isinstance(rule, MatchRule) and rule.negate
    assert keep(rule, t) == ([1, 2], 1)
    assert keep(parse_rule('instruction startswith "Wh"'), t)[0] == [1]
    assert keep(parse_rule('instruction contains ":"'), t)[0] == [0, 2]
    member = parse_rule("language in [en, de]")
    assert isinstance(member, MembershipRule)
    assert keep(member, t) == ([0, 1], 1)
    assert keep(parse_rule("language not in [en]"), t)[0] == [1, 2]
    assert keep(parse_rule('language == "de"'), t)[0] == [1]
    with pytest.raises(RecipeError, match="non-empty list"):
        parse_rule("language in en")
    with pytest.raises(RecipeError, match="quoted string"):
        parse_rule("instruction endswith 3")
    lists = pa.table({"other_task_category": [["Math"], []]})
    with pytest.raises(RecipeError, match="compare single values"):
        parse_rule("other_task_category in [Math]").keep_mask(lists)


def test_dedup_keeps_first_row_of_each_group():
    t = pa.table({"uuid": ["a", "b", "c", "d", "e"],
                  "min_similar_uuid": ["a", "a", None, "c", "e"]})
    rule = parse_rule("dedup")
    assert isinstance(rule, DedupRule) and parse_rule({"dedup": True}).describe() == rule.describe()
    assert keep(rule, t) == ([0, 2, 4], 0)


def test_keep_longest_ties_nulls_and_order():
    t = pa.table({"response_length": [5, 9, None, 9, 1, 7]})
    rule = parse_rule("keep_longest 3")
    assert isinstance(rule, KeepLongestRule) and rule.selection
    assert keep(rule, t) == ([1, 3, 5], 1)      # original order kept; the null row is dropped
    assert keep(parse_rule({"keep_longest": {"n": 4, "by": "response_length"}}), t)[0] == [0, 1, 3, 5]
    assert keep(parse_rule("keep_longest 100"), t)[0] == list(range(6))
    with pytest.raises(RecipeError, match="whole number"):
        parse_rule({"keep_longest": {"n": -1}})


@pytest.mark.parametrize("bad, match", [
    ("input_quality >>= good", "cannot read the value"),
    ("reward is 3", "not understood"),
    ({"column": "x", "op": "~", "value": 1}, "unknown operator"),
    ({"dedup": {"by": "x"}}, "takes no options"),
    (42, "not understood"),
])
def test_parse_rule_errors(bad, match):
    with pytest.raises(RecipeError, match=match):
        parse_rule(bad)


def test_spec_errors_and_lengths_last(tmp_path):
    spec = parse_spec("rules:\n  - keep_longest 2\n  - instruct_reward > 0\n", default_name="x", source="t")
    assert [r.kind for r in spec.rules] == ["compare", "keep_longest"]
    with pytest.raises(RecipeError, match="rule 2"):
        parse_spec("rules: [dedup, 'a >']", default_name="x", source="t")
    with pytest.raises(RecipeError, match="no rules"):
        parse_spec("rules: []", default_name="x", source="t")
    with pytest.raises(RecipeError, match="allowed keys"):
        parse_spec("rules: [dedup]\nbogus: 1", default_name="x", source="t")
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_spec("rules: [", default_name="x", source="t")
    with pytest.raises(RecipeError, match="unknown filter preset 'nope'"):
        load_filter_spec("nope")


def test_ordering_lengths_last_matters():
    """Longest-N after the row-wise rules (paper): the 2 longest *good* rows, not good rows of the 2 longest."""
    t = pa.table({"input_quality": ["poor", "poor", "good", "good", "good"],
                  "response_length": [100, 90, 10, 30, 20]})
    spec = parse_spec("rules: [keep_longest 2, input_quality >= good]", default_name="x", source="t")
    out, report = apply_spec(spec, {"c": t})
    assert out["c"].column("response_length").to_pylist() == [30, 20]
    assert [p["c"].removed for p in report.outcomes] == [2, 1]


def test_presets_are_the_papers():
    assert {"pro", "air", "pro-card"} <= set(preset_names())
    pro = [r.describe() for r in load_filter_spec("pro").rules]
    assert pro == ["input_quality >= average", "min_neighbor_distance > 0", "instruct_reward > -12",
                   "keep_longest 300000 by response_chars"]          # characters, as the paper and notebook
    air = [r.describe() for r in load_filter_spec("air").rules]
    assert air == ["input_quality >= good", "difficulty >= medium", "min_neighbor_distance > 0",
                   "reward_difference > 0", "keep_longest 300000 by response_chars"]
    card = [r.describe() for r in load_filter_spec("pro-card").rules]
    assert "instruct_reward >= -10" in card and "instruction not endswith ':'" in card
    assert "dedup (first row of each near-duplicate group)" in card     # the notebook's keep-one-per-group
    assert not any("min_neighbor_distance" in r for r in card)


def _rows(n: int, seed: int, prefix: str) -> dict:
    import random

    rng = random.Random(seed)
    q = ["very poor", "poor", "average", "good", "excellent"]
    d = ["very easy", "easy", "medium", "hard", "very hard"]
    rows = {k: [] for k in ("uuid", "instruction", "response", "input_quality", "difficulty",
                            "min_neighbor_distance", "instruct_reward", "reward_difference",
                            "response_length", "min_similar_uuid", "repeat_count", "response_chars")}
    for i in range(n):
        uid = f"{prefix}-{i}"
        rows["uuid"].append(uid)
        rows["instruction"].append(f"instruction {i}" + (":" if i % 7 == 0 else "?"))
        rows["response"].append("x" * rng.randint(1, 50))
        rows["input_quality"].append(None if i % 11 == 0 else rng.choice(q))
        rows["difficulty"].append(rng.choice(d))
        rows["min_neighbor_distance"].append(0.0 if i % 5 == 0 else rng.random())
        rows["instruct_reward"].append(rng.uniform(-20, 5))
        rows["reward_difference"].append(rng.uniform(-3, 3))
        rows["response_length"].append(rng.randint(1, 400))
        rows["min_similar_uuid"].append(f"{prefix}-{i - 1}" if i % 5 == 0 and i else None)
        rows["repeat_count"].append(1 if i % 5 == 0 else 0)
        rows["response_chars"].append(rng.randint(1, 4000))
    return rows


def expected(rows: dict, pred, n: int, by: str = "response_chars") -> list[str]:
    idx = [i for i in range(len(rows["uuid"])) if pred({k: v[i] for k, v in rows.items()})]
    top = sorted(idx, key=lambda i: -rows[by][i])[:n]
    return [rows["uuid"][i] for i in sorted(top)]


def make_tagged_dir(root: Path, sizes: dict[str, int]) -> dict[str, dict]:
    data = {}
    for k, (config, n) in enumerate(sizes.items()):
        rows = _rows(n, seed=k, prefix=config)
        (root / config).mkdir(parents=True)
        ds = Dataset.from_dict(rows)
        half = n // 2
        ds.select(range(half)).to_parquet(root / config / "train-00000-of-00002.parquet")
        ds.select(range(half, n)).to_parquet(root / config / "train-00001-of-00002.parquet")
        data[config] = rows
    (root / "magpie_manifest.json").write_text(json.dumps({"model": "tiny", "counts": sizes}))
    (root / ".magpie").mkdir()
    return data


RANK = {"very poor": 0, "poor": 1, "average": 2, "good": 3, "excellent": 4,
        "very easy": 0, "easy": 1, "medium": 2, "hard": 3, "very hard": 4}


def test_pro_and_air_presets_on_synthetic_dir(tmp_path):
    src = tmp_path / "src"
    data = make_tagged_dir(src, {"single_turn": 300, "math": 120})
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}

    report = filter_dataset(src, "pro", tmp_path / "pro")
    for config, rows in data.items():
        got = pq.read_table(tmp_path / "pro" / config).column("uuid").to_pylist()
        want = expected(rows, lambda r: r["input_quality"] is not None and RANK[r["input_quality"]] >= 2
                        and r["min_neighbor_distance"] > 0 and r["instruct_reward"] > -12, 300000)
        assert got == want and report.rows_out[config] == len(want)

    air_file = tmp_path / "air20.yaml"
    air_file.write_text("name: air20\nrules: [input_quality >= good, difficulty >= medium, "
                        "min_neighbor_distance > 0, reward_difference > 0, keep_longest 5]\n")
    report = pipeline.filter(src, str(air_file), tmp_path / "air")   # the command: filter, then the card
    for config, rows in data.items():
        got = pq.read_table(tmp_path / "air" / config).column("uuid").to_pylist()
        want = expected(rows, lambda r: r["input_quality"] is not None and RANK[r["input_quality"]] >= 3
                        and RANK[r["difficulty"]] >= 2 and r["min_neighbor_distance"] > 0
                        and r["reward_difference"] > 0, 5, by="response_length")
        assert got == want and len(want) == 5
        removed = sum(p[config].removed for p in report.outcomes)
        assert removed == len(rows["uuid"]) - 5
    manifest = json.loads((tmp_path / "air" / "magpie_manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["filter"]["name"] == "air20"
    assert manifest["filter"]["rows_out"] == {"math": 5, "single_turn": 5}
    assert [s["rule"] for s in manifest["filter"]["steps"]][-1] == "keep_longest 5 by response_length"
    assert manifest["filter"]["steps"][0]["removed_null"]["single_turn"] == sum(
        q is None for q in data["single_turn"]["input_quality"])
    assert not (tmp_path / "air" / ".magpie").exists()
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before      # input untouched
    # same features (types) as the input; the card names the configs
    assert pq.read_schema(next((tmp_path / "air" / "math").glob("*.parquet"))).metadata[b"huggingface"]
    assert "config_name: math" in (tmp_path / "air" / "README.md").read_text()
    # re-running into an earlier filter output replaces it
    filter_dataset(src, "pro", tmp_path / "air")
    assert json.loads((tmp_path / "air" / "magpie_manifest.json").read_text())["filter"]["name"] == "pro"


def test_bad_inputs(tmp_path):
    src = tmp_path / "src"
    make_tagged_dir(src, {"c": 10})
    with pytest.raises(DatasetDirError, match=r"needs column 'language'.*--step language"):
        filter_dataset(src, _yaml(tmp_path, "rules: [language == en]"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(DatasetDirError, match="not found"):
        filter_dataset(tmp_path / "nope", "pro", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetDirError, match="no config"):
        filter_dataset(tmp_path / "empty", "pro", tmp_path / "o")
    with pytest.raises(DatasetDirError, match="not the input"):
        filter_dataset(src, "pro", src)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetDirError, match="not an earlier filter output"):
        filter_dataset(src, "pro", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    return str(path)


def test_cli_end_to_end(tmp_path):
    src = tmp_path / "src"
    make_tagged_dir(src, {"single_turn": 40})
    proc = run_cli("filter", str(src), "--preset", "pro", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "instruct_reward > -12" in proc.stderr and "rows removed per rule" in proc.stderr
    from datasets import load_dataset

    ds = load_dataset(str(tmp_path / "out"), "single_turn", split="train")
    assert ds.num_rows == json.loads((tmp_path / "out" / "magpie_manifest.json").read_text())[
        "filter"]["rows_out"]["single_turn"]
    assert set(ds.column_names) >= {"uuid", "input_quality", "response_length"}

    bad = run_cli("filter", str(src), "--preset", _yaml(tmp_path, "rules: [safety == safe]"),
                  "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: filter rule 'safety == \"safe\"' needs column 'safety', missing in config 'single_turn'; "
        "run `magpie-hub tag DIR --step safety` first"]
    assert not (tmp_path / "bad").exists()
    unknown = run_cli("filter", str(src), "--preset", "platinum", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "unknown filter preset 'platinum'" in unknown.stderr


def test_empty_result_is_written_and_warned(tmp_path):
    src = tmp_path / "src"
    make_tagged_dir(src, {"single_turn": 12, "math": 6})
    empty = run_cli("filter", str(src), "--preset", _yaml(tmp_path, "rules: ['uuid startswith single']"),
                    "--out", str(tmp_path / "empty"))
    assert empty.returncode == 0, empty.stderr
    assert "warning" in empty.stderr and "no rows in math" in empty.stderr.replace("\n", " ")
    assert pq.read_table(tmp_path / "empty" / "math").num_rows == 0
    assert pq.read_table(tmp_path / "empty" / "single_turn").num_rows == 12
    assert (tmp_path / "empty" / "README.md").is_file()


def test_balance_rule_strata_and_quotas():
    t = pa.table({"difficulty": ["very easy", "easy", "medium", "hard", "Easy", None, "very hard", "medium"],
                  "response_chars": [10, 50, 40, 90, 30, 99, 20, 70]})
    spec = parse_spec('rules: [{balance: {by: difficulty, shares: {"<= easy": 1, ">= medium": 1}}}, '
                      'keep_longest 4 by response_chars]', default_name="b", source="t")
    balance, longest = spec.rules
    assert longest.balance is balance and balance.quotas(5) == [3, 2] and balance.quotas(4) == [2, 2]
    assert keep(balance, t) == ([0, 1, 2, 3, 4, 6, 7], 1)                # the null label goes, counted
    out, report = apply_spec(spec, {"c": t})
    # two longest easy-or-below (50, 30) + two longest medium-or-above (90, 70), original order kept
    assert out["c"].column("response_chars").to_pylist() == [50, 90, 30, 70]
    assert [o["c"].removed for o in report.outcomes] == [1, 3]
    assert longest.describe() == "keep_longest 4 by response_chars per difficulty stratum"
    short = parse_spec('rules: [{balance: {by: difficulty, shares: {"very hard": 1, easy: 3}}}, keep_longest 8]',
                       default_name="b", source="t")
    assert short.rules[0].strata == {"very hard": ("very hard",), "easy": ("easy",)}
    for bad, match in [('{balance: {by: difficulty, shares: {">= great": 1}}}', "not a label"),
                       ('{balance: {by: difficulty, shares: {"<= easy": 1, "easy|medium": 1}}}', "two strata"),
                       ('{balance: {by: difficulty, shares: {easy: 0}}}', "sum to 0"),
                       ('{balance: {by: difficulty}}', "exactly")]:
        with pytest.raises(RecipeError, match=match):
            parse_spec(f"rules: [{bad}, keep_longest 3]", default_name="b", source="t")
    with pytest.raises(RecipeError, match="followed by keep_longest"):
        parse_spec("rules: [{balance: {by: difficulty, shares: {easy: 1}}}]", default_name="b", source="t")


@pytest.mark.parametrize("preset", ["pro", "air", "pro-card", "filter2", "filter3", "filter4", "filter5", "filter6"])
def test_table5_presets_run_and_report_what_each_rule_removed(preset):
    rows = _rows(400, seed=3, prefix="c")
    rows["difficulty"] = [None if i % 13 == 0 else d for i, d in enumerate(rows["difficulty"])]
    table = pa.table(rows)
    spec = load_filter_spec(preset)
    small = [KeepLongestRule(20, r.by) if isinstance(r, KeepLongestRule) else r for r in spec.rules]
    if spec.rules[-1].balance is not None:                      # keep the stratification on the smaller n
        small[-1].balance = spec.rules[-1].balance
    spec.rules = small
    out, report = apply_spec(spec, {"c": table})
    removed = [o["c"].removed for o in report.outcomes]
    assert len(removed) == len(spec.rules) and all(r >= 0 for r in removed)
    assert sum(removed) == 400 - out["c"].num_rows and out["c"].num_rows <= 20
    assert all(r > 0 for r in removed), dict(zip([r.describe() for r in spec.rules], removed, strict=True))
    data = report.to_dict()
    assert [s["rule"] for s in data["steps"]] == [r.describe() for r in spec.rules]
    if preset == "filter6":
        labels = [RANK[d] for d in out["c"].column("difficulty").to_pylist()]
        assert sum(r <= 1 for r in labels) == sum(r >= 2 for r in labels) == 10
