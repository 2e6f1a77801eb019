"""LLM-judge tag steps: robust JSON parsing, the scripted judge (fixed answers, malformed ones included),
bounded concurrency, the real local transformers path on a tiny random model, and bad input."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import cli_env, run_cli
from datasets import Dataset

from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.errors import RecipeError
from magpie_hub.tags import step_class
from magpie_hub.tags.base import TagContext
from magpie_hub.tags.columns import DIFFICULTIES, QUALITIES, TASK_CATEGORIES
from magpie_hub.tags.judge import TaskCategoryStep, classification_prompt, difficulty_prompt, quality_prompt
from magpie_hub.tags.judge_parse import extract_object, normalise_label
from magpie_hub.tags.runner import tag_dataset


@pytest.mark.parametrize("text, prefix, want", [
    ('{"a": "b"}', "", {"a": "b"}),
    ('```json\n{"primary_tag": "Math", "other_tags": []}\n```\nHope this helps!', "", {"primary_tag": "Math",
                                                                                      "other_tags": []}),
    ('Sure! Here is my answer: {"difficulty": "easy"} and some {trailing} text', "", {"difficulty": "easy"}),
    ("{'input_quality': 'good', 'explanation': \"it's clear\"}", "", {"input_quality": "good",
                                                                      "explanation": "it's clear"}),
    ('{"a": 1, "b": [1, 2,],}', "", {"a": 1, "b": [1, 2]}),
    ('\n    "intent": "The user wants {x}",\n    "difficulty": "hard"\n', "{", {"intent": "The user wants {x}",
                                                                             "difficulty": "hard"}),
    ('"difficulty": "medium"', "{", {"difficulty": "medium"}),              # stopped before the closing }
    ('{"difficulty": "medium"}', "{", {"difficulty": "medium"}),            # the model repeated the brace
    ('```json\n{"input_quality": "poor"', "", {"input_quality": "poor"}),   # unterminated fence and object
    ('"explanation": "unterminated', "{", {"explanation": "unterminated"}),
    ("no json here", "", None),
    ("", "", None),
    (None, "", None),
    ("[1, 2, 3]", "", None),
    ('{"a": }', "", None),
    ("{__import__('os').system('echo hi')}", "", None),                    # never evaluated
])
def test_extract_object(text, prefix, want):
    assert extract_object(text, prefix=prefix) == want


def test_normalise_label_is_strict():
    assert normalise_label("  Very Hard ", DIFFICULTIES) == "very hard"
    assert normalise_label("[medium]", DIFFICULTIES) == "medium"
    assert normalise_label("very  hard.", DIFFICULTIES) == "very hard"
    assert normalise_label("coding & debugging", TASK_CATEGORIES) == "Coding & Debugging"
    assert normalise_label("<Math>", TASK_CATEGORIES) == "Math"
    for bad in ("Coding and Debugging", "medium-hard", "[very easy/easy/medium/hard/very hard]", "", 3, None,
                "mediums"):
        assert normalise_label(bad, {**TASK_CATEGORIES, **dict.fromkeys(DIFFICULTIES)}) is None


def test_prompts_carry_the_label_sets():
    ins = "How do I reverse a list in Python?"
    c = classification_prompt(ins)
    assert ins in c and all(f'"{name}"' in c for name in TASK_CATEGORIES) and len(TASK_CATEGORIES) == 12
    assert '"primary_tag"' in c and '"other_tags"' in c
    d = difficulty_prompt(ins)
    assert ins in d and "very easy/easy/medium/hard/very hard" in d and '"intent"' in d and '"knowledge"' in d
    q = quality_prompt(ins)
    assert ins in q and all(f"- {label}:" in q for label in QUALITIES) and '"input_quality"' in q


# Copied from magpie-align/magpie @ b734a36818e4ba7ef7f0f582fc55f7e860407d26, exp/str_utils.py
# (input_difficulty_rating / input_quality_rating with input = INS); "\x20" = a trailing space of the original.
INS = "How do I reverse a list in Python?"
OFFICIAL_DIFFICULTY = (
    "\n# Instruction \n\nYou first need to identify the given user intent and then label the difficulty level of "
    "the user query based on the content of the user query.\n\n## User Query\n```\n" + INS + "\n```\n\n"
    "## Output Format\nGiven the user query, in your output, you first need to identify the user intent and the "
    "knowledge needed to solve the task in the user query.\nThen, rate the difficulty level of the user query as "
    "`very easy`, `easy`, `medium`, `hard`, or `very hard`.\n\nNow, please output the user intent and difficulty "
    "level below in a json format by filling in the placeholders in []:\n```\n{   \n"
    '    "intent": "The user wants to [....]",\n'
    '    "knowledge": "To solve this problem, the models need to know [....]",\n'
    '    "difficulty": "[very easy/easy/medium/hard/very hard]"\n}\n```\n')
OFFICIAL_QUALITY = (
    "\n# Instruction\n\nYou need to rate the quality of the user query based on its clarity, specificity, and "
    "coherence.\n\nThe rating scale is as follows:\n\n"
    "- very poor: The query is unclear, vague, or incoherent. It lacks essential information and context.\n"
    "- poor: The query is somewhat unclear or lacks important details. It requires significant clarification.\n"
    "- average: The query is moderately clear and specific. It may require some additional information for a "
    "complete understanding.\n"
    "- good: The query is clear, specific, and mostly well-formed. It provides sufficient context for "
    "understanding the user's intent.\n"
    "- excellent: The query is very clear, specific, and well-articulated. It contains all the necessary "
    "information and context for providing a comprehensive response.\n\n## User Query\n```\n" + INS + "\n```\n\n"
    "## Output Format\nGiven the user query, you first need to give an assesement, highlighting the strengths "
    "and/or weaknesses of the user query.\nThen, you need to output a rating from very poor to excellent by "
    "filling in the placeholders in [...]:\n```\n{   \n"
    '    "explanation": "[...]",\n    "input_quality": "[very poor/poor/average/good/excellent]"\n}\n```\n')
OFFICIAL_CLASSIFICATION_LINES = [
    '    "Role playing",  # Users engage in scenarios requiring ChatGPT to adopt a character or persona.',
    '    "Creative writing",  # Users seek assistance with crafting stories, poems, or other creative texts. ',
    '    "Others"  # Any queries that do not fit into the above categories or are of a miscellaneous nature.',
    "## Output Format:",
    'Now, please output your tags below in a json format by filling in the placeholders in <...>:',
]


def test_judge_prompts_are_the_official_ones_byte_for_byte():
    assert difficulty_prompt(INS) == OFFICIAL_DIFFICULTY
    assert quality_prompt(INS) == OFFICIAL_QUALITY
    c = classification_prompt(INS)
    assert c.startswith("\n# Instruction\n\nPlease label the task tags for the user query.\n\n## User Query\n```\n"
                        + INS + "\n```\n") and c.endswith('    "other_tags": ["<tag 1>", "<tag 2>", ... ]\n}\n```\n')
    lines = c.split("\n")
    assert all(line in lines for line in OFFICIAL_CLASSIFICATION_LINES)
    listed = [line.split('"')[1] for line in lines if line.startswith('    "') and "  # " in line]
    assert listed == list(TASK_CATEGORIES)                   # the prompt's tags are the registered labels
    assert TaskCategoryStep.default_max_new_tokens == 1024   # the official unitag.py --max_tokens


def test_official_answers_parse():
    """What the official tagger gets back after its "{" prefill and "}" stop parses here too."""
    answers = [('\n    "intent": "The user wants to reverse a list",\n    "knowledge": "Python lists",\n'
                '    "difficulty": "very easy"\n', "difficulty", "very easy"),
               ('   \n    "explanation": "Clear and specific.",\n    "input_quality": "good"\n', "input_quality", "good"),
               ('\n    "primary_tag": "Coding & Debugging",\n    "other_tags": ["Information seeking"]\n',
                "primary_tag", "Coding & Debugging")]
    for text, key, want in answers:
        assert extract_object(text, prefix="{")[key] == want
        assert extract_object(text + "}", prefix="{")[key] == want     # vLLM include_stop_str_in_output


def make_rows_dir(root: Path, configs: dict[str, list[str | None]], tags: list | None = None) -> Path:
    for name, instructions in configs.items():
        rows = []
        for i, ins in enumerate(instructions):
            res = f"Answer number {i}."
            conv = [{"from": "human", "value": ins or ""}, {"from": "gpt", "value": res}]
            rows.append({"uuid": f"{name}-{i}", "model": "tiny", "gen_input_configs": {
                "temperature": 1.0, "top_p": 1.0, "seed": i, "pre_query_template": "", "input_generator": "tiny"},
                "instruction": ins, "response": res, "conversations": conv,
                "messages": [{"role": "user", "content": ins or ""}, {"role": "assistant", "content": res}],
                "turns": 1, "category": None})
        (root / name).mkdir(parents=True)
        Dataset.from_list(rows, features=GENERATION_FEATURES).to_parquet(
            str(root / name / "train-00000-of-00001.parquet"))
    manifest = {"model": {"id": "tiny"}, "recipe": {"tags": tags}} if tags else {"model": {"id": "tiny"}}
    (root / "magpie_manifest.json").write_text(json.dumps(manifest))
    return root


def write_answers(path: Path, answers: list[dict]) -> str:
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return str(path)


# The scripted judge's answers to the task_category question: one per instruction (matched by id).
CATEGORY_ANSWERS = [
    ("Q01", '"primary_tag": "Math", "other_tags": ["Reasoning", "math", "<tag 1>"]'),       # prefilled, no }
    ("Q02", '```json\n{"primary_tag": "coding & debugging", "other_tags": []}\n```'),       # fence, case
    ("Q03", "{'primary_tag': 'Planning', 'other_tags': 'Advice seeking'}\nI chose..."),      # quotes, prose
    ("Q04", '"primary_tag": "Cooking", "other_tags": []'),                                  # off-label
    ("Q05", "I think this is about math."),                                                 # unparseable
    ("Q06", '"primary_tag": "Information seeking"'),
    ("Q07", '"other_tags": ["Math"]'),                                                      # no primary: off
]


def test_scripted_judge_through_the_runner(tmp_path, tiny_llama3):
    answers = [{"match": f"[{qid}]", "text": text} for qid, text in CATEGORY_ANSWERS]
    answers.append({"match": "[Q08]", "text": '"primary_tag": "Math"', "finish_reason": "error"})
    answers.append({"match": "[Q09]", "text": '"primary_tag": "Ma', "finish_reason": "length"})
    answers.append({"match": "[Q10]", "text": '"difficulty": "VERY EASY", "intent": "The user wants x", '
                                              '"knowledge": " arithmetic "'})
    answers.append({"match": "[Q11]", "text": '"difficulty": "trivial", "intent": "x"'})
    answers.append({"match": "[Q12]", "text": '"explanation": "Clear and specific.", "input_quality": "Good"'})
    answers.append({"match": "[Q13]", "text": '"explanation": "?", "input_quality": "[very poor/poor/average]"'})
    opts = {"model": str(tiny_llama3), "backend": "scripted",
            "backend_options": {"answers": write_answers(tmp_path / "answers.jsonl", answers)}, "concurrency": 4}
    qids = [f"[Q{i:02d}] instruction {i}" for i in range(1, 10)]
    root = make_rows_dir(tmp_path / "ds", {"a": qids[:5] + [None], "b": qids[5:]})
    tag_dataset(root, [{"task_category": opts}])

    a = pq.read_table(root / "a").to_pydict()
    b = pq.read_table(root / "b").to_pydict()
    assert a["task_category"] == ["Math", "Coding & Debugging", "Planning", None, None, None]
    assert a["other_task_category"] == [["Reasoning"], [], ["Advice seeking"], None, None, None]
    assert b["task_category"] == ["Information seeking", None, None, None]
    judge = str(tiny_llama3)
    assert a["task_category_generator"] == [judge, judge, judge, None, None, None]
    counts = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["task_category"]["counts"]
    assert counts == {"rows": 10, "tagged": 4, "unparseable": 1, "off_label": 3, "failed": 1, "no_input": 1}

    root2 = make_rows_dir(tmp_path / "ds2", {"c": ["[Q10] sum 2+2", "[Q11] x", "[Q12] y", "[Q13] z"]})
    tag_dataset(root2, [{"difficulty": opts}, {"quality": opts}])
    c = pq.read_table(root2 / "c").to_pydict()
    assert c["difficulty"] == ["very easy", None, None, None]
    assert c["intent"][0] == "The user wants x" and c["knowledge"][0] == "arithmetic"
    assert c["difficulty_generator"] == [judge, None, None, None]
    assert c["input_quality"] == [None, None, "good", None]
    assert c["quality_explanation"] == [None, None, "Clear and specific.", None]
    steps = json.loads((root2 / "magpie_manifest.json").read_text())["tags"]["steps"]
    # one answers file serves both steps: the other step's answers lack this step's label -> off-label
    assert steps["difficulty"]["counts"] == {"rows": 4, "tagged": 1, "unparseable": 0, "off_label": 3,
                                             "failed": 0, "no_input": 0}
    assert steps["quality"]["counts"]["tagged"] == 1 and steps["quality"]["counts"]["off_label"] == 3
    assert steps["quality"]["backend"] == "scripted" and steps["quality"]["temperature"] == 0.0


def test_prompt_uses_the_judges_chat_template_and_bounded_concurrency(tmp_path, tiny_llama3):
    answers = write_answers(tmp_path / "a.jsonl", [{"text": '"primary_tag": "Math"'}])
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    step = TaskCategoryStep(ctx, model=str(tiny_llama3), backend="scripted", concurrency=3,
                            backend_options={"answers": answers, "delay_ms": 20})
    step.setup()
    try:
        prompt = step.prompt_for({"instruction": "  What is 2+2?  "})
        expected = step.chat_format.tokenizer.apply_chat_template(
            [{"role": "user", "content": classification_prompt("  What is 2+2?  ")}], tokenize=False,
            add_generation_prompt=True)
        assert prompt == expected + "{"
        assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
        assert step.stop()[0] == "}" and "<|eot_id|>" in step.stop()
        in_flight, peak = 0, 0
        inner = step.backend.generate

        async def counting(request):
            nonlocal in_flight, peak
            assert request.params.temperature == 0.0 and request.role == "judge"
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await inner(request)
            finally:
                in_flight -= 1

        step.backend.generate = counting
        out = step.run({"instruction": [f"q{i}" for i in range(10)]})
        assert out["task_category"] == ["Math"] * 10 and peak == 3
    finally:
        step.close()


def test_real_local_transformers_judge(tmp_path, tiny_llama3):
    """The real path: transformers backend, tiny random Llama-3 judge. Its answers are noise: most rows are
    null; what must hold is that every row is accounted for and no label is invented."""
    instructions = [f"Explain topic number {i} in two sentences." for i in range(6)] + [None]
    root = make_rows_dir(tmp_path / "ds", {"single": instructions})
    opts = {"model": str(tiny_llama3), "max_new_tokens": 12, "backend_options": {"batch_size": 8}}
    tag_dataset(root, [{"quality": opts}])
    t = pq.read_table(root / "single").to_pydict()
    assert all(v is None or v in QUALITIES for v in t["input_quality"])
    assert all((g is not None) == (v is not None) for g, v in zip(t["quality_generator"], t["input_quality"],
                                                                      strict=True))
    info = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["quality"]
    c = info["counts"]
    assert c["rows"] == 7 and c["no_input"] == 1
    assert c["tagged"] + c["unparseable"] + c["off_label"] + c["failed"] + c["no_input"] == c["rows"]
    assert c["tagged"] == sum(v is not None for v in t["input_quality"])
    assert info["backend"] == "transformers" and info["model"] == str(tiny_llama3)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input(tmp_path, tiny_llama3):
    root = make_rows_dir(tmp_path / "ds", {"single": ["What is 2+2?"]})
    before = _digest(root)
    # the default judge (Llama-3-8B-Instruct) is not available offline: one line, exit 2, nothing written
    proc = run_cli("tag", str(root), "--step", "quality", env=cli_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "quality" in lines[0]
    assert _digest(root) == before

    bad_opts = make_rows_dir(tmp_path / "ds2", {"single": ["x"]}, tags=[{"difficulty": {"temperature": 1}}])
    proc = run_cli("tag", str(bad_opts), "--step", "difficulty")
    assert proc.returncode == 2 and "unknown options ['temperature']" in proc.stderr

    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    with pytest.raises(RecipeError, match="concurrency must be a whole number"):
        step_class("quality")(ctx, concurrency=0)
    step = step_class("quality")(ctx, model=str(tiny_llama3), backend="scripted")
    with pytest.raises(RecipeError, match="needs backend_options.answers"):
        step.setup()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    step = step_class("quality")(ctx, model=str(tiny_llama3), backend="scripted",
                                 backend_options={"answers": str(bad)})
    with pytest.raises(RecipeError, match="bad.jsonl:2 is not a JSON object"):
        step.setup()


def test_scripted_backend_cycles_and_reports_unmatched(tmp_path):
    from magpie_hub.generate.backends import GenerationRequest, SamplingParams, get_backend

    path = write_answers(tmp_path / "a.jsonl", [{"match": "special", "text": "S"}, {"text": "one<|eot_id|>x"},
                                                {"text": "two", "finish_reason": "length"}])
    backend = get_backend("scripted", "m", answers=path)
    params = SamplingParams(temperature=0.0)

    async def ask(prompt):
        return await backend.generate(GenerationRequest(prompt, params, stop=("<|eot_id|>",)))

    results = [asyncio.run(ask(p)) for p in ("a", "a special b", "b", "c")]
    assert [(r.text, r.finish_reason) for r in results] == [("one", "stop"), ("S", "stop"), ("two", "length"),
                                                            ("one", "stop")]
    only_matched = get_backend("scripted", "m", answers=write_answers(tmp_path / "b.jsonl",
                                                                      [{"match": "zzz", "text": "Z"}]))
    r = asyncio.run(only_matched.generate(GenerationRequest("nope", params)))
    assert r.finish_reason == "error" and r.error
    assert backend.info().name == "scripted"


def test_judge_through_a_tgi_server(tmp_path, tiny_llama3, monkeypatch):
    """Any backend: the same step against a TGI stand-in on 127.0.0.1 (simulated generation)."""
    from huggingface_hub import constants
    from tgi_server import launched

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks even 127.0.0.1
    log = tmp_path / "requests.jsonl"
    root = make_rows_dir(tmp_path / "ds", {"single": [f"Question {i}?" for i in range(5)]})
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--log-requests", str(log)) as (url, _):
        tag_dataset(root, [{"difficulty": {"model": str(tiny_llama3), "backend": "tgi", "endpoint": url,
                                           "max_new_tokens": 16, "concurrency": 2}}])
    requests = [json.loads(line)["body"] for line in log.read_text().splitlines()]
    assert len(requests) == 5
    for body in requests:
        assert body["inputs"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n{")
        assert "very easy/easy/medium/hard/very hard" in body["inputs"]
        params = body["parameters"]
        assert params["max_new_tokens"] == 16 and "}" in params["stop"] and not params.get("do_sample")
    info = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["difficulty"]
    c = info["counts"]
    assert c["rows"] == 5 and c["tagged"] + c["unparseable"] + c["off_label"] + c["failed"] == 5
    assert info["backend"] == "tgi"


def test_secrets_in_options_never_reach_the_manifest(tmp_path, tiny_llama3, monkeypatch):
    secret = "hf_" + "s3cr3tT0kenValue1234"
    monkeypatch.setenv("HF_TOKEN", secret)
    # the backends' typed options refuse unknown keys, so the secret rides in an option's value (a path)
    (tmp_path / f"x{secret}").mkdir()
    answers = write_answers(tmp_path / f"x{secret}" / "a.jsonl",
                            [{"text": '"input_quality": "good", "explanation": "ok"'}])
    root = make_rows_dir(tmp_path / "ds", {"single": ["q1", "q2"]})
    tag_dataset(root, [{"quality": {"model": str(tiny_llama3), "backend": "scripted",
                                    "backend_options": {"answers": answers}}}])
    text = (root / "magpie_manifest.json").read_text()
    assert secret not in text and "s3cr3t" not in text
    assert json.loads(text)["tags"]["steps"]["quality"]["counts"]["tagged"] == 2
