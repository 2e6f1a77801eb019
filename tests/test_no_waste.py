"""No waste, no failed builds: truncated turns kept per role (and recorded for filters), degenerate loops
stopped, exhausted rows replaced deterministically, kept / generated tokens reported; repetition
penalty and no-repeat n-grams passed to the backends."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import cli_env
from rich.console import Console
from test_generate import SEED, ScriptedBackend, collect, make_engine, spec

from magpie_hub import pipeline
from magpie_hub.build.checkpoint import Checkpoint
from magpie_hub.build.progress import summary_table
from magpie_hub.dataset.schema import build_features
from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends.base import (
    GenerationRequest,
    GenerationResult,
    LoopStop,
    SamplingParams,
    loop_period,
)
from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend
from magpie_hub.generate.backends.http.tgi import TGIBackend
from magpie_hub.generate.backends.local.batching import Row, RowPenalty, RowSampler, penalize
from magpie_hub.generate.engine import CleanupOptions, ConversationSpec
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import parse_recipe

LOOP = LoopStop()


# -- truncation policy in the engine -----------------------------------------------------------------------

def test_truncated_responses_kept_instructions_dropped_and_recorded():
    specs = [spec(0, turns=2, uuid="a"), spec(1, turns=1, uuid="b")]
    script = {
        ("a", 2, "assistant", 1): GenerationResult("A cut mid", "length", 64),      # kept (default policy)
        ("b", 1, "user", 1): GenerationResult("Q cut", "length", 32),               # instruction: dropped
    }
    backend = ScriptedBackend(specs, script=script)
    engine = make_engine(backend)
    convs = {c.spec.uuid: c for c in asyncio.run(collect(engine, specs))}
    assert convs["a"].attempts == 1 and convs["a"].turns[1][1] == "A cut mid"
    assert convs["a"].finish_reasons == ["stop", "stop", "stop", "length"]
    assert convs["b"].attempts == 2 and convs["b"].finish_reasons == ["stop", "stop"]
    assert engine.dropped == {"truncated": 1} and engine.truncated_kept == {"length": 1}
    assert engine.kept_tokens == sum(c.generated_tokens for c in convs.values())

    keep_all = CleanupOptions(truncated_instruction="keep")
    engine = make_engine(ScriptedBackend(specs, script=script), cleanup=keep_all)
    convs = {c.spec.uuid: c for c in asyncio.run(collect(engine, specs))}
    assert convs["b"].attempts == 1 and convs["b"].finish_reasons == ["length", "stop"] and not engine.dropped

    drop_all = CleanupOptions(truncated_response="drop")
    engine = make_engine(ScriptedBackend(specs, script=script), cleanup=drop_all)
    convs = {c.spec.uuid: c for c in asyncio.run(collect(engine, specs))}
    assert convs["a"].attempts == 2 and engine.dropped == {"truncated": 2} and not engine.truncated_kept


def test_loops_end_as_truncated_loop_cut_after_the_first_copy():
    loop_params = SamplingParams(temperature=0.0, max_new_tokens=64, seed=SEED, loop_stop=LOOP)
    s = ConversationSpec(config="c", index=0, uuid="a", turns=1, category=None, system_prompt=None,
                         instruction_params=SamplingParams(max_new_tokens=32, seed=SEED, loop_stop=LOOP),
                         response_params=loop_params)
    looping = "Sure. Here is the answer: " + "I can help with that. " * 6 + "I can"
    script = {("a", 1, "user", 1): GenerationResult("Tell me " + "more and " * 8, "length", 32),
              ("a", 1, "assistant", 2): GenerationResult(looping, "length", 64)}
    engine = make_engine(ScriptedBackend([s], script=script))
    (conv,) = asyncio.run(collect(engine, [s]))
    assert engine.dropped == {"loop": 1}                                   # a looping instruction: dropped
    assert conv.attempts == 2 and conv.finish_reasons == ["stop", "loop"]
    assert conv.turns[0][1].count("I can help with that.") == 1 and conv.turns[0][1].startswith("Sure.")
    assert engine.truncated_kept == {"loop": 1}
    # a response that stopped by itself is never relabelled, whatever its text
    result = GenerationResult(looping, "stop", 40)
    assert engine.clean(result, "assistant", loop=LOOP)[2] == "stop"


def test_loop_detector_thresholds():
    assert LOOP.in_tokens([7, 8, 9] + [1, 2, 3, 4] * 8)                    # 4-token unit x 8 = 32 tokens
    assert not LOOP.in_tokens([7, 8, 9] + [1, 2, 3, 4] * 7)                # 28 tokens: too short a tail
    assert LOOP.in_tokens(list(range(40)) + list(range(11)) * 3)          # 11-token sentence x 3
    assert not LOOP.in_tokens(list(range(40)) + list(range(25)) * 3)      # a unit longer than max_ngram
    assert not LOOP.in_tokens(random.Random(0).choices(range(50), k=500))
    assert LOOP.text_cut("| --- | --- | --- | --- |") is None               # a table rule is not a loop
    assert LOOP.text_cut("x = [0, 0, 0, 0, 0]") is None
    text = "Intro. " + "ha" * 40
    assert text[:LOOP.text_cut(text)] == "Intro. ha"
    assert loop_period("abcabcabc", max_period=5, repeats=3, min_span=9) == 3


# -- replacement of exhausted specs ----------------------------------------------------------------------------

def test_engine_replaces_exhausted_specs_in_the_same_task():
    specs = [spec(0, turns=1, uuid="a"), spec(1, turns=1, uuid="b")]
    replacements = {"a": spec(0, turns=1, uuid="a-r1")}
    script = {("a", 1, "user", k): GenerationResult("list:", "stop", 2) for k in (1, 2)}   # colon: dropped
    backend = ScriptedBackend([*specs, *replacements.values()], script=script)
    seen = []

    def replace(s: ConversationSpec):
        nxt = replacements.get(s.uuid)
        return None if nxt is None else ConversationSpec(**{**nxt.__dict__, "replacement": 1})

    engine = make_engine(backend, max_attempts=2, replace=replace, on_exhausted=seen.append)
    convs = sorted(asyncio.run(collect(engine, specs)), key=lambda c: c.spec.index)
    assert [c.spec.uuid for c in convs] == ["a-r1", "b"] and convs[0].spec.index == 0
    assert [s.uuid for s in seen] == [s.uuid for s in engine.exhausted] == ["a"]
    assert engine.replaced == 1 and engine.failed == [] and engine.dropped == {"colon": 2}


# -- the build ----------------------------------------------------------------------------------------------

RECIPE = {"name": "no-waste", "model": "tiny:llama3", "backend": "dummy", "seed": 3,
          "backend_options": {"colon_rate": 0.4, "truncate_rate": 0.15, "words": 10},
          "max_new_tokens": {"instruction": 24, "response": 24}, "max_attempts": 2, "max_replacements": 50,
          "configs": {"single_turn": {"rows": 24}, "multi_turn": {"rows": 8, "turns": 2}}}


def _recipe(tmp_path, name="r.yaml", **changes):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return path


def test_build_holds_exact_rows_replaces_deterministically_and_reports_tokens(tmp_path):
    out = tmp_path / "ds"
    manifest = pipeline.build(_recipe(tmp_path, filters={"rules": ["truncated == false"]}), out=out)
    for name, n, turns in (("single_turn", 24, 1), ("multi_turn", 8, 2)):
        table = pq.read_table(out / name)
        assert table.num_rows == n and len(set(table.column("uuid").to_pylist())) == n
        assert table.schema.names == list(build_features(turns))
        for row in table.to_pylist():
            assert len(row["finish_reasons"]) == len(row["messages"])
            assert row["truncated"] == any(f != "stop" for f in row["finish_reasons"])
            assert all(f == "stop" for f in row["finish_reasons"][0::2])    # instructions never kept cut
    entry = manifest["configs"]["single_turn"]
    assert entry["replaced"] > 0 and entry["dropped"]["colon"] > 0
    assert entry["truncated_rows"] > 0 and sum(entry["truncated_turns"].values()) >= entry["truncated_rows"]
    assert 0 < entry["kept_tokens"] < entry["generated_tokens"]
    assert entry["kept_token_ratio"] == round(entry["kept_tokens"] / entry["generated_tokens"], 4)
    assert manifest["totals"]["replaced"] == sum(c["replaced"] for c in manifest["configs"].values())
    # the replaced rows keep their slot's sampling mix and category, and the plan's exact counts hold
    rows = pq.read_table(out / "single_turn").to_pylist()
    uuids = [r["uuid"] for r in rows]
    recipe = parse_recipe({**RECIPE})
    plan = recipe.plan("single_turn")
    replaced = [i for i, u in enumerate(uuids) if u != plan.uuid(i)]
    assert len(replaced) == entry["replaced"]
    assert all(any(u == plan.uuid(i, k) for k in range(1, 51)) for i, u in zip(replaced, (uuids[i] for i in replaced),
                                                                                 strict=True))
    # a kept truncated response is there for filters: the recipe's `truncated == false` removed those rows
    filtered = pq.read_table(tmp_path / "ds-filtered" / "single_turn")
    assert filtered.num_rows == 24 - entry["truncated_rows"]
    assert not any(filtered.column("truncated").to_pylist())
    # same recipe, other concurrency: identical rows (replacement does not depend on scheduling)
    other = tmp_path / "ds2"
    pipeline.build(_recipe(tmp_path, "r2.yaml", concurrency=1), out=other, configs=["single_turn"])
    assert pq.read_table(other / "single_turn").to_pylist() == rows
    # the closing table shows replacements and kept / generated tokens
    console = Console(record=True, width=80)   # a pipe's width: one line per config, nothing folded
    console.print(summary_table(manifest["configs"], run_wall_s=1.0))
    text = console.export_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("single_turn"))
    assert "repl." in text and f"{entry['generated_tokens']:,}" in line
    assert f"{entry['kept_tokens'] / entry['generated_tokens']:.0%}" in line


def test_fingerprint_follows_the_policy_not_max_replacements(tmp_path, capsys):
    base = parse_recipe({**RECIPE})
    same = parse_recipe({**RECIPE, "max_replacements": 7})
    assert base.fingerprint("single_turn") == same.fingerprint("single_turn")
    for change in ({"truncation": {"response": "drop"}}, {"truncation": {"loops": None}},
                   {"truncation": {"loops": {"repeats": 4}}}, {"max_attempts": 3},
                   {"response_sampling": {"repetition_penalty": 1.1}},
                   {"instruction_sampling": [{"no_repeat_ngram_size": 4}]}):
        assert parse_recipe({**RECIPE, **change}).fingerprint("single_turn") != base.fingerprint("single_turn"), change
    assert parse_recipe({**RECIPE, "truncation": {"loops": False}}).truncation.loops is None
    defaults = parse_recipe({**RECIPE}).truncation
    assert (defaults.instruction, defaults.response, defaults.loops.repeats) == ("drop", "keep", 3)


@pytest.mark.parametrize(("change", "message"), [
    ({"cleanup": {"drop_truncated": False}}, "moved to the recipe's `truncation:` section"),
    ({"truncation": {"response": "maybe"}}, "truncation.response"),
    ({"backend": "tgi", "backend_options": {"endpoint": "http://x"},
      "response_sampling": {"no_repeat_ngram_size": 3}}, "tgi backend cannot apply no_repeat_ngram_size"),
    ({"response_sampling": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_bad_truncation_and_sampling_options(change, message):
    with pytest.raises(RecipeError, match=message.replace("`", ".")):
        parse_recipe({**RECIPE, **change})


# -- repetition_penalty / no_repeat_ngram_size ----------------------------------------------------------------

def test_row_penalty_matches_transformers_processors():
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    rng = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 40, (12,), generator=rng).tolist()
    generated = torch.randint(0, 40, (30,), generator=rng).tolist()
    for penalty, n in ((1.3, None), (None, 3), (1.2, 2), (0.8, 1)):
        row = RowPenalty(prompt, penalty, n)
        for step in range(len(generated) + 1):
            scores = torch.randn(50, generator=rng)
            ids = torch.tensor([prompt + generated[:step]])
            expected = scores.unsqueeze(0).clone()
            if penalty is not None:
                expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, expected)
            if n is not None:
                expected = NoRepeatNGramLogitsProcessor(n)(ids, expected)
            got = row(scores.clone(), generated[:step])
            assert torch.equal(got, expected[0]), (penalty, n, step)
    assert RowPenalty.of(SamplingParams(), prompt) is None


def test_http_backends_send_the_repetition_penalty():
    params = SamplingParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.15)
    tgi = TGIBackend("m", endpoint="http://127.0.0.1:9")
    assert tgi._request_kwargs(params, (), 8)["repetition_penalty"] == 1.15
    assert "repetition_penalty" not in tgi._request_kwargs(SamplingParams(temperature=0.0), (), 8)
    oai = OpenAICompletionsBackend("m", endpoint="http://127.0.0.1:9")
    oai.server = {"owned_by": "vllm"}
    assert oai._request_kwargs(params, (), 8)["repetition_penalty"] == 1.15
    oai.server = {"owned_by": "llamacpp"}
    body = oai._request_kwargs(params, (), 8)
    assert body["repeat_penalty"] == 1.15 and body["repeat_last_n"] == -1 and "repetition_penalty" not in body


def test_local_rows_stop_at_a_loop_and_apply_penalties():
    """The continuous batcher's rows (and the fallback sampler) with loop_stop and the penalties; the
    tiny test models end every text at once, so the decode loop is driven by hand here (the real-model
    check of the build exercises it end to end)."""
    params = SamplingParams(0.0, max_new_tokens=400, loop_stop=LOOP, repetition_penalty=1.5, no_repeat_ngram_size=2)
    row = Row(request=GenerationRequest("p", params), ids=[1, 2, 3], budget=400, end_ids={0}, criterion=None,
              deliver=lambda result: None)
    unit = list(range(5, 16))                                   # an 11-token sentence, three times
    finished = [row.step(t) for t in [20, 21, *unit, *unit, *unit]]
    assert finished[-1] and not any(finished[:-1]) and not row.stop_hit   # ends like a budget: "length"
    plain = Row(request=GenerationRequest("p", SamplingParams(0.0)), ids=[1, 2, 3], budget=9, end_ids={0},
                criterion=None, deliver=lambda result: None)
    assert plain.penalty is None and not any(plain.step(t) for t in unit[:8])
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    out = penalize(logits, [row, plain])
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[0], RowPenalty([1, 2, 3], 1.5, 2)(logits[0].clone(), row.tokens))
    assert penalize(logits, [plain]) is logits                      # no penalty anywhere: untouched
    # model.generate fallback: the greedy choice skips a token that would repeat the bigram (1, 2)
    sampler = RowSampler([0.0], [1.0], [0], [RowPenalty([1, 2, 3], None, 2)], prompt_len=3)
    scores = torch.zeros(1, 10)
    scores[0, 2], scores[0, 4] = 5.0, 1.0
    assert int(sampler(torch.tensor([[1, 2, 3, 1]]), scores)[0].argmax()) == 4


def test_manifest_records_the_outcome_on_disk(tmp_path):
    out = tmp_path / "ds"
    pipeline.build(_recipe(tmp_path, configs={"single_turn": {"rows": 6}}), out=out)
    entry = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]
    for key in ("replaced", "kept_tokens", "kept_token_ratio", "truncated_rows", "truncated_turns"):
        assert key in entry


def test_kill_9_during_replacements_then_resume_gives_the_same_rows(tmp_path):
    """Exhausted specs are recorded as they happen: a resume goes on with the next replacement and the
    rows equal those of one uninterrupted run (and of a 2-process run: replacement stays within a rank)."""
    configs = {"single_turn": {"rows": 16}}
    slow = {"colon_rate": 0.6, "words": 6, "delay_ms": 30}
    path = _recipe(tmp_path, configs=configs, backend_options=slow, max_attempts=1, concurrency=2)
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "magpie_hub.cli", "build", str(path), "--out", str(out)]
    pieces = out / ".magpie" / "build" / "single_turn"

    def lines(marker: bytes) -> int:
        return sum(p.read_bytes().count(marker) for p in pieces.glob("rows-*.jsonl")) if pieces.is_dir() else 0

    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (lines(b'"x":1') < 3 or lines(b'"r":') < 4) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    plan = parse_recipe(yaml.safe_load(path.read_text())).plan("single_turn")
    scan = Checkpoint(out, "single_turn").scan(16, plan.uuid)
    assert scan.exhausted and len(scan.locations) < 16
    pipeline.build(path, out=out)
    reference = tmp_path / "ref"
    pipeline.build(_recipe(tmp_path, "ref.yaml", configs=configs, backend_options={**slow, "delay_ms": 0},
                           max_attempts=1), out=reference)
    rows = pq.read_table(out / "single_turn").to_pylist()
    assert len(rows) == 16 and rows == pq.read_table(reference / "single_turn").to_pylist()
    entry = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]
    assert entry["replaced"] == sum(r["uuid"] != plan.uuid(i) for i, r in enumerate(rows)) > 0

    dp = tmp_path / "dp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "magpie_hub.cli", "build",
                           str(tmp_path / "ref.yaml"), "--out", str(dp)], env=cli_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(dp / "single_turn").to_pylist() == rows
    assert json.loads((dp / MANIFEST).read_text())["configs"]["single_turn"]["replaced"] == entry["replaced"]
