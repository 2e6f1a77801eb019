"""Recipe validation, per-row planning, and bad-input handling of `magpie-hub build` (exit 2, out untouched)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from magpie_hub.cli import main
from magpie_hub.errors import RecipeError
from magpie_hub.recipe.load import load_recipe, parse_recipe
from magpie_hub.recipe.plan import exact_counts
from magpie_hub.recipe.prompts import BUILTIN_CATEGORY_PROMPTS, MULTI_TURN_SYSTEM_PROMPT

BUILDERS = sorted((ROOT / "builders").glob("*.yaml"))
BASE = {"model": "tiny:llama3", "backend": "dummy", "configs": {"single_turn": {"rows": 4}}}


def _with(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.update(changes)
    return data


def test_shipped_recipes_validate():
    names = {p.name for p in BUILDERS}
    assert {"demo.yaml", "magpie-air.yaml", "magpie-pro.yaml", "magpie-pro-mt.yaml",
            "magpie-math-code.yaml", "magpie-qwen2.5.yaml"} <= names
    for path in BUILDERS:
        recipe = load_recipe(path)
        assert recipe.configs, path
    demo = load_recipe(ROOT / "builders" / "demo.yaml")
    assert demo.model == "smollm2"                       # the embedded real default
    assert list(demo.configs) == ["single_turn", "multi_turn", "math", "code"]
    assert demo.configs["multi_turn"].turns in (2, 3)
    assert demo.configs["math"].category == "math" and demo.configs["code"].category == "code"
    pro = load_recipe(ROOT / "builders" / "magpie-pro.yaml")
    assert pro.backend == "tgi" and pro.backend_options["endpoint"].startswith("http")
    counts = exact_counts([m.share for m in pro.instruction_sampling], pro.configs["single_turn"].rows)
    assert counts == [300_000, 300_000, 300_000, 100_000]
    air = load_recipe(ROOT / "builders" / "magpie-air.yaml")
    air_counts = exact_counts([m.share for m in air.instruction_sampling], air.configs["single_turn"].rows)
    assert sum(air_counts) == 3_000_000 and sorted(set(air_counts)) == [100_000, 300_000]
    assert load_recipe(ROOT / "builders" / "magpie-pro-mt.yaml").configs["multi_turn"].turns == 2


def test_official_prompts_verbatim():
    recipe = parse_recipe(BASE)
    assert recipe.multi_turn_system_prompt.startswith("You are a helpful Al assistant.")  # their typo
    assert "thorough,relevant" in MULTI_TURN_SYSTEM_PROMPT
    assert BUILTIN_CATEGORY_PROMPTS["math"].endswith("arriving at the correct solutions.")
    assert "\nYour purpose is to assist users in understanding coding concepts" in BUILTIN_CATEGORY_PROMPTS["code"]
    assert set(BUILTIN_CATEGORY_PROMPTS) == {"math", "code", "translation"}


@pytest.mark.parametrize("changes, needle", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"configs": {"a": {"rows": 0}}}, "configs.a.rows"),
    ({"configs": {"a": {"rows": -3}}}, "configs.a.rows"),
    ({"configs": {"a": {"rows": 2, "turns": 0}}}, "configs.a.turns"),
    ({"configs": {"a": {"rows": 2, "categories": {"math": -0.5, "code": 1}}}}, "weight of 'math' must be >= 0"),
    ({"configs": {"a": {"rows": 2, "categories": {"math": 0, "code": 0}}}}, "sum to 0"),
    ({"configs": {"a": {"rows": 2, "category": "poetry"}}}, "unknown category 'poetry'"),
    ({"configs": {"a": {"rows": 2, "category": "math", "system_prompt": "x"}}}, "at most one of"),
    ({"configs": {"a": {"rows": 2, "roows": 3}}}, "unknown key 'roows' in configs.a"),
    ({"configs": {"../x": {"rows": 2}}}, "becomes a directory"),
    ({"configs": {}}, "configs"),
    ({"instruction_sampling": [{"temperature": 1.0, "top_p": 1.5}]}, "instruction_sampling.0.top_p"),
    ({"instruction_sampling": [{"temperature": -1.0}]}, "instruction_sampling.0.temperature"),
    ({"instruction_sampling": [{"share": 0}]}, "shares sum to 0"),
    ({"max_new_tokens": {"instruction": 0}}, "max_new_tokens.instruction"),
    ({"model": "  "}, "model is empty"),
])
def test_bad_recipes(changes, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe(_with(**changes))
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_model_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="missing required key 'model'"):
        parse_recipe({"configs": {"a": {"rows": 1}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(top)


def test_weights_are_normalised_without_exact_sum_trap():
    # 0.1 x 10 does not sum to exactly 1.0 in floating point: accepted and split exactly.
    cats = {f"c{i}": 0.1 for i in range(10)}
    recipe = parse_recipe(_with(category_prompts={k: f"prompt {k}" for k in cats},
                                configs={"mix": {"rows": 1000, "categories": cats}}))
    plan = recipe.plan("mix")
    counts = collections.Counter(plan.row(i).category for i in range(1000))
    assert counts == {k: 100 for k in cats}
    assert {plan.row(i).system_prompt for i in range(1000)} == {f"prompt {k}" for k in cats}
    assert exact_counts([1, 1, 1], 10) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(exact_counts([0.3, 0.7, 1e-9], 7)) == 7


def test_sampling_mix_shares_assigned_exactly_and_deterministically():
    mixes = [{"temperature": 1.0, "top_p": 1.0, "share": 3}, {"temperature": 1.1, "top_p": 0.995, "share": 3},
             {"temperature": 1.2, "top_p": 0.995, "share": 3}, {"temperature": 1.25, "top_p": 0.99, "share": 1}]
    recipe = parse_recipe(_with(instruction_sampling=mixes, configs={"st": {"rows": 1000}}))
    plan = recipe.plan("st")
    rows = [plan.row(i) for i in range(1000)]
    assert collections.Counter(r.mix.temperature for r in rows) == {1.0: 300, 1.1: 300, 1.2: 300, 1.25: 100}
    # spread over the indices, not in blocks
    assert len({r.mix.temperature for r in rows[:20]}) >= 2
    again = parse_recipe(_with(instruction_sampling=mixes, configs={"st": {"rows": 1000}})).plan("st")
    assert [again.row(i) for i in range(1000)] == rows
    assert len({r.uuid for r in rows}) == 1000
    other_seed = parse_recipe(_with(seed=1, instruction_sampling=mixes, configs={"st": {"rows": 1000}})).plan("st")
    assert other_seed.uuid(0) != plan.uuid(0)
    with pytest.raises(IndexError):
        plan.row(1000)


def test_overrides_and_fingerprint():
    recipe = parse_recipe(_with(revision="abc", backend_options={"delay_ms": 1, "max_concurrency": 3}),
                          overrides={"rows": 7, "model": "other/model", "backend": "tgi", "endpoint": "http://h:1"})
    assert recipe.configs["single_turn"].rows == 7
    assert recipe.model == "other/model" and recipe.revision is None
    # the dummy backend's delay_ms is dropped; max_concurrency, an option of both backends, stays
    assert recipe.backend == "tgi" and recipe.backend_options == {"max_concurrency": 3, "endpoint": "http://h:1"}
    with pytest.raises(RecipeError, match="--rows must be a positive integer"):
        parse_recipe(BASE, overrides={"rows": 0})
    a = parse_recipe(BASE)
    assert a.fingerprint("single_turn") == parse_recipe(_with(backend="tgi", concurrency=3)).fingerprint("single_turn")
    assert a.fingerprint("single_turn") != parse_recipe(_with(seed=5)).fingerprint("single_turn")
    assert a.fingerprint("single_turn") != parse_recipe(BASE, overrides={"rows": 5}).fingerprint("single_turn")
    with pytest.raises(RecipeError, match="unknown config 'nope'"):
        a.select(["nope"])


# -- the CLI on bad input: one line, exit 2, nothing written into --out ------------------------------------

def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("case", ["unknown_key", "negative_weight", "rows_zero", "turns_zero", "unknown_config",
                                  "unknown_backend", "cli_rows_zero", "out_is_file_child", "foreign_out"])
def test_cli_bad_input_exit_2_out_untouched(case, tmp_path, capsys):
    data, extra = _with(), []
    out = tmp_path / "out"
    if case == "unknown_key":
        data["sampling"] = {}
    elif case == "negative_weight":
        data["configs"] = {"mix": {"rows": 3, "categories": {"math": -1, "code": 2}}}
    elif case == "rows_zero":
        data["configs"]["single_turn"]["rows"] = 0
    elif case == "turns_zero":
        data["configs"]["single_turn"]["turns"] = 0
    elif case == "unknown_config":
        extra = ["--config", "single_turn", "--config", "multi_turn"]
    elif case == "unknown_backend":
        extra = ["--backend", "vllm-magic"]
    elif case == "cli_rows_zero":
        extra = ["--rows", "0"]
    elif case == "out_is_file_child":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    recipe = _write(tmp_path, data)
    with pytest.raises(SystemExit) as exc:
        main(["build", str(recipe), "--out", str(out), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    after = sorted(p.name for p in tmp_path.rglob("*") if p.name != "recipe.yaml")
    assert after == before, f"{case}: the output dir was touched"


def test_cli_unavailable_model_subprocess(tmp_path):
    data = _with(model="no-such-org/no-such-model-xyz")
    recipe = _write(tmp_path, data)
    proc = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "out").exists()
