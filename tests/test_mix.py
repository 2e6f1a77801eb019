"""Mix control (issue 11): recipe targets, the closed loop's exactness, determinism, resume and budget, the
baselines, and the embedding classifier as a tag step. The loop runs on the dummy backend with a scripted
classifier (labels from a hash of the text; a "steerable" variant follows the steering prompt 70% of the
time, like a model that listens to its system prompt)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env

from magpie_hub import pipeline
from magpie_hub.build.buckets import Buckets
from magpie_hub.build.mix import MixBudgetError
from magpie_hub.build.run import run_build
from magpie_hub.card.mix_plot import plot_mix
from magpie_hub.errors import RecipeError
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import load_recipe, parse_recipe
from magpie_hub.recipe.mix import bucket_targets
from magpie_hub.recipe.steering_prompts import CATEGORY_STEERING, DIFFICULTY_STEERING
from magpie_hub.tags.columns import DIFFICULTIES, TASK_CATEGORIES
from magpie_hub.tags.mix_classify import check_mix_labels
from magpie_hub.tags.runner import tag_dataset

TESTS = Path(__file__).resolve().parent
LABELS = {"task_category": tuple(TASK_CATEGORIES), "difficulty": DIFFICULTIES}
MIX = {"task_category": {"Math": 0.25, "Coding & Debugging": 0.2, "Creative writing": 0.15,
                         "Information seeking": 0.15, "rest": 0.25},
       "difficulty": {"easy": 0.4, "medium": 0.35, "rest": 0.25},
       "tolerance": 0.02, "steer": {"wave": 8}, "budget": {"max_generated_rows": 2000}}
RECIPE = {
    "name": "test-mix", "model": "tiny:llama3", "backend": "dummy",
    "backend_options": {"empty_rate": 0.05, "error_rate": 0.03}, "seed": 5,
    "instruction_sampling": [{"temperature": 1.0, "share": 1}, {"temperature": 1.3, "share": 1}],
    "max_new_tokens": {"instruction": 32, "response": 32}, "concurrency": 8,
    "configs": {"mixed": {"rows": 40, "mix": MIX}},
}


def _hash(text: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big")


class HashClassifier:
    """Deterministic labels from a hash of the instruction; ``steerable``: follows the row's steering
    (``category`` column; difficulty from the pre-query template's difficulty sentence) 70% of the time."""

    labels = LABELS

    def __init__(self, steerable: bool = False):
        self.steerable, self.calls = steerable, 0

    def classify(self, rows):
        self.calls += 1
        out = []
        for row in rows:
            text = row["instruction"]
            lab = {d: LABELS[d][_hash(text, d) % len(LABELS[d])] for d in LABELS}
            if self.steerable and _hash(text, "follow") % 10 < 7:
                template = row["gen_input_configs"]["pre_query_template"]
                lab["task_category"] = row["category"] or lab["task_category"]
                lab["difficulty"] = next((d for d, s in DIFFICULTY_STEERING.items() if s in template),
                                         lab["difficulty"])
            out.append(lab)
        return out

    def info(self):
        return {"name": "hash", "model": "sha256", "steerable": self.steerable}


def write_recipe(path: Path, **mix_changes) -> Path:
    data = json.loads(json.dumps(RECIPE))
    data["configs"]["mixed"]["mix"].update(mix_changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def build(recipe: Path, out: Path, classifier=None):
    return run_build(load_recipe(recipe), recipe_path=recipe, out=out,
                     mix_classifier=lambda name: classifier or HashClassifier())


def counts(rows, classifier=None) -> dict[str, Counter]:
    labels = (classifier or HashClassifier()).classify(rows)
    mix = MIX
    out = {}
    for dim, shares in ((d, mix[d]) for d in LABELS):
        out[dim] = Counter(lab[dim] if lab[dim] in shares else "rest" for lab in labels)
    return out


def rows_of(out: Path) -> list[dict]:
    return pq.read_table(out / "mixed").to_pylist()


def expected(rows: int) -> dict[str, dict[str, int]]:
    rec = parse_recipe(json.loads(json.dumps(RECIPE)))
    tables = bucket_targets(rec.configs["mixed"].mix, rows)
    return {dim: {k[pos]: n for k, n in tables[pos].items()} for pos, dim in enumerate(LABELS)}


def test_every_bucket_gets_exactly_its_rows_and_the_manifest_says_so(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    result = build(recipe, tmp_path / "ds")
    rows = rows_of(tmp_path / "ds")
    assert len(rows) == 40 and len({r["uuid"] for r in rows}) == 40
    got = counts(rows)
    want = expected(40)
    assert {d: dict(c) for d, c in got.items()} == want       # exact: 10 Math, 8 code, 6, 6, 10 rest; ...
    mix = result.manifest["configs"]["mixed"]["mix"]
    assert mix["within_tolerance"] and mix["accepted"] == 40 and mix["classifier"]["name"] == "hash"
    assert mix["candidates"] > 40 and sum(mix["rejected"].values()) == mix["candidates"] - 40
    assert mix["buckets"]["task_category"]["Math"]["rows"] == 10
    assert mix["tokens_per_accepted_row"] > 0 and 0 < mix["acceptance_rate"] < 1
    assert not list((tmp_path / "ds" / ".magpie" / "build" / "mixed").glob("candidates-*.jsonl"))


def test_same_seed_same_rows_and_a_finished_build_is_not_redone(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    build(recipe, tmp_path / "a")
    build(recipe, tmp_path / "b")
    assert rows_of(tmp_path / "a") == rows_of(tmp_path / "b")
    clf = HashClassifier()
    build(recipe, tmp_path / "a", clf)
    assert clf.calls == 0


def test_budget_stops_with_a_report_then_a_larger_budget_resumes_to_the_same_rows(tmp_path):
    small = write_recipe(tmp_path / "small.yaml", budget={"max_generated_rows": 24})
    out = tmp_path / "ds"
    with pytest.raises(MixBudgetError) as err:
        build(small, out)
    text = str(err.value)
    assert "24 candidates" in text and "still short" in text and "re-run the same command" in text
    assert not (out / "mixed").exists()                             # nothing half-written
    resumed = HashClassifier()
    build(write_recipe(tmp_path / "big.yaml"), out, resumed)        # same fingerprint: the budget is not in it
    build(write_recipe(tmp_path / "ref.yaml"), tmp_path / "ref")
    assert rows_of(out) == rows_of(tmp_path / "ref")


def test_token_budget_per_row(tmp_path):
    with pytest.raises(MixBudgetError, match="mix budget ran out"):
        build(write_recipe(tmp_path / "r.yaml", budget={"max_tokens_per_row": 5}), tmp_path / "ds")
    assert not (tmp_path / "ds" / "mixed").exists()


def _log_lines(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (out / ".magpie" / "build" / "mixed").glob("candidates-*"))


def test_kill_9_anywhere_then_resume_gives_the_same_buckets(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    data = yaml.safe_load(recipe.read_text())
    data["backend_options"]["delay_ms"] = 30
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "ds"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_mix; from pathlib import Path; "
            f"test_mix.build(Path({str(recipe)!r}), Path({str(out)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _log_lines(out) < 30 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    piece = sorted((out / ".magpie" / "build" / "mixed").glob("candidates-*.jsonl"))[0]
    with open(piece, "ab") as fh:
        fh.write(b'{"c": 999, "u": "torn')                          # a line torn by the kill
    build(recipe, out)
    data["backend_options"].pop("delay_ms")
    ref = tmp_path / "ref.yaml"
    ref.write_text(yaml.safe_dump(data, sort_keys=False))
    build(ref, tmp_path / "ref")
    assert rows_of(out) == rows_of(tmp_path / "ref")
    assert {d: dict(c) for d, c in counts(rows_of(out)).items()} == expected(40)


def test_steering_needs_fewer_candidates_than_the_natural_mix_and_beats_blind_prompts(tmp_path):
    steerable = HashClassifier(steerable=True)
    report = {}
    for mode in ("closed_loop", "natural", "blind"):
        recipe = write_recipe(tmp_path / f"{mode}.yaml", mode=mode)
        report[mode] = build(recipe, tmp_path / mode, steerable).manifest["configs"]["mixed"]["mix"]
    closed, natural, blind = report["closed_loop"], report["natural"], report["blind"]
    assert sum(closed["distance"].values()) < 1e-9                  # exact
    assert sum(blind["distance"].values()) > 0.05 and natural["accepted"] == blind["accepted"] == 40
    assert sum(natural["distance"].values()) > sum(blind["distance"].values())
    # steering pays: the closed loop needs fewer candidates than rejection sampling of natural generations
    plain = write_recipe(tmp_path / "plain.yaml", steer={"wave": 8, "category_prompts": False,
                                                          "difficulty_prompts": False})
    unsteered = build(plain, tmp_path / "plain", steerable).manifest["configs"]["mixed"]["mix"]
    assert closed["candidates"] < unsteered["candidates"]
    math = closed["buckets"]["task_category"]["Math"]["steered_by"]
    assert any(k.startswith("Math") for k in math)


@pytest.mark.parametrize(("change", "message"), [
    ({"task_category": {"Math": 0.5, "Reasoning": 0.3}}, "shares sum to 0.8, not 1"),
    ({"task_category": {"Math": 0.7, "Reasoning": 0.6, "rest": 0}}, "named shares sum to 1.3 > 1"),
    ({"tolerance": 0.02, "rows": 20}, "finer than 20 rows allow"),
    ({"joint": True, "difficulty": None}, "joint needs both"),
    ({"budget": {"max_rows": 3}}, "unknown key 'max_rows'"),
])
def test_bad_targets_are_one_line_at_load(change, message):
    data = json.loads(json.dumps(RECIPE))
    cfg = data["configs"]["mixed"]
    if "rows" in change:
        cfg["rows"] = change.pop("rows")
    cfg["mix"].update(change)
    cfg["mix"] = {k: v for k, v in cfg["mix"].items() if v is not None}
    with pytest.raises(RecipeError) as err:
        parse_recipe(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_label_lists_the_official_ones():
    data = json.loads(json.dumps(RECIPE))
    data["configs"]["mixed"]["mix"]["task_category"] = {"Maths": 0.5, "rest": 0.5}
    with pytest.raises(RecipeError) as err:
        check_mix_labels(parse_recipe(data))
    assert "unknown label 'Maths'" in str(err.value) and "Coding & Debugging" in str(err.value)


def test_steering_prompts_cover_the_official_labels():
    assert set(CATEGORY_STEERING) == set(TASK_CATEGORIES) and set(DIFFICULTY_STEERING) == set(DIFFICULTIES)


def test_a_row_that_would_strand_a_rarer_pair_is_held():
    rec = parse_recipe(json.loads(json.dumps(RECIPE)))
    mix = rec.configs["mixed"].mix.model_copy(update={"task_category": {"Math": 0.5, "rest": 0.5},
                                                       "difficulty": {"easy": 0.5, "rest": 0.5}})
    buckets = Buckets(mix, 4)
    for pair in (("Math", "rest"), ("rest", "easy")):        # Math was only ever seen not-easy
        buckets.seen[pair] += 1
    assert buckets.offer(("rest", "rest")) == "held"       # else Math could only fill the last slots "easy"
    offers = [("Math", "rest"), ("Math", "rest"), ("Math", "easy"), ("rest", "rest"), ("rest", "easy"), ("rest", "easy")]
    assert [buckets.offer(k) for k in offers] == ["accepted", "accepted", "overflow", "overflow", "accepted", "accepted"]
    assert buckets.full()


def test_joint_targets_fill_each_pair(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", joint=True, task_category={"Math": 0.5, "rest": 0.5},
                          difficulty={"easy": 0.5, "rest": 0.5})
    build(recipe, tmp_path / "ds")
    labels = HashClassifier().classify(rows_of(tmp_path / "ds"))
    pairs = Counter((lab["task_category"] == "Math", lab["difficulty"] == "easy") for lab in labels)
    assert set(pairs.values()) == {10}


def test_embedding_classifier_in_the_build_and_as_tag_step_agree(tmp_path, tiny_llama3):
    """The real path: pipeline.build with the offline MiniLM classifier, calibrated on a sample labelled by
    a (scripted) judge, then ``tag --step mix_classify`` re-classifies the result with the same classifier
    (the calibration read back from the manifest): every bucket exactly on target."""
    answers = tmp_path / "judge.jsonl"       # each judge step cycles through all lines: the other step's are off-label
    lines = [{"text": '"primary_tag": "Math", "other_tags": []'}, {"text": '"intent": "x", "difficulty": "easy"'},
             {"text": '"primary_tag": "Creative writing"'}, {"text": '"intent": "y", "difficulty": "hard"'},
             {"text": '"primary_tag": "Information seeking"'}]
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    judge = {"model": str(tiny_llama3), "backend": "scripted", "backend_options": {"answers": str(answers)}}
    data = json.loads(json.dumps(RECIPE))
    data["configs"]["mixed"] = {"rows": 20, "mix": {"task_category": {"Math": 0.25, "rest": 0.75},
                                                    "difficulty": {"easy": 0.5, "rest": 0.5},
                                                    "classifier_options": {"calibrate": 8, "judge": judge},
                                                    "tolerance": 0.025, "steer": {"wave": 16}}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "ds"
    manifest = pipeline.build(recipe, out=out)
    mix = manifest["configs"]["mixed"]["mix"]
    assert mix["classifier"]["name"] == "embedding" and "MiniLM" in mix["classifier"]["model"]
    cal = mix["classifier"]["calibration"]
    assert cal["sample"] == 8 and 0 < cal["task_category"]["judged"] < 8 and cal["difficulty"]["judged"] > 0
    assert cal["task_category"]["agreement_after"] >= cal["task_category"]["agreement_before"]
    assert cal["difficulty"]["agreement_after"] >= cal["difficulty"]["agreement_before"]
    assert "mix" in (out / "README.md").read_text().lower()
    tag_dataset(out, ["mix_classify"])                             # what `magpie-hub tag --step mix_classify` runs
    rows = rows_of(out)
    cats = Counter(r["mix_task_category"] == "Math" for r in rows)
    diffs = Counter(r["mix_difficulty"] == "easy" for r in rows)
    assert cats == {True: 5, False: 15} and diffs == {True: 10, False: 10}
    assert json.loads((out / MANIFEST).read_text())["configs"]["mixed"]["mix"]["within_tolerance"]
    assert plot_mix(out) == {"mix_mixed": "assets/mix_mixed.png"} and (out / "assets" / "mix_mixed.png").stat().st_size
