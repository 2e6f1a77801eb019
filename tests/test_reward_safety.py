"""Reward and safety steps on tiny random models of those kinds, built here: a Llama sequence-classification
reward model (num_labels=1) with the Llama-3 chat template, and a tiny causal LM as a Llama-Guard-style
guard (with a moderation chat template, and without one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_reward_model
from datasets import Dataset, Value
from test_judge import write_answers

from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.errors import DatasetDirError, ModelError, RecipeError
from magpie_hub.filters.apply import filter_dataset
from magpie_hub.tags import step_class
from magpie_hub.tags.base import TagContext
from magpie_hub.tags.runner import tag_dataset
from magpie_hub.tags.safety import llama_guard_2_prompt

PAIRS = [("What is 2+2?", "4."),
         ("Write a haiku about autumn leaves falling slowly.", "Red leaves drift and fall,\nquiet on the path."),
         ("Explain recursion.", "A function that calls itself " * 6),
         ("Hi", "Hello! How can I help you today?"),
         ("Name three primes.", "2, 3 and 5."),
         ("Tell me a joke about cats, please, a long one.", "Why did the cat sit on the computer? " * 3),
         ("Translate 'bonjour' to English.", None),
         (None, "Orphan response.")]

# A Llama-Guard-style moderation template (same layout as the Llama-Guard-2 format built by the step).
GUARD_TEMPLATE = (
    "{{ bos_token }}[INST] Task: Check if there is unsafe content in '{% if messages | length % 2 == 0 %}Agent"
    "{% else %}User{% endif %}' messages in conversations according our safety policy with the below "
    "categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    "{% for c in ['Violent Crimes', 'Non-Violent Crimes', 'Sex Crimes', 'Child Exploitation', "
    "'Specialized Advice', 'Privacy', 'Intellectual Property', 'Indiscriminate Weapons', 'Hate', 'Self-Harm', "
    "'Sexual Content'] %}S{{ loop.index }}: {{ c }}. \n{% endfor %}"
    "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
    "{% for m in messages %}{% if m['role'] == 'user' %}User{% else %}Agent{% endif %}: "
    "{{ m['content'] | trim }}\n\n{% endfor %}<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {% if messages | length % 2 == 0 %}Agent{% else %}User"
    "{% endif %} message in the above conversation:\n - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories. [/INST]"
)


@pytest.fixture(scope="module")
def tiny_rm(tiny_llama3, tmp_path_factory) -> Path:
    return tiny_reward_model(tiny_llama3, tmp_path_factory.mktemp("rm"))


@pytest.fixture(scope="module")
def tiny_guard(tiny_llama3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "guard"
    shutil.copytree(tiny_llama3, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = GUARD_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (out / extra).unlink(missing_ok=True)
    return out


def make_dir(root: Path, pairs, base: list | None = None) -> Path:
    features = GENERATION_FEATURES.copy()
    if base is not None:
        features["base_output"] = Value("string")
    rows = []
    for i, (ins, res) in enumerate(pairs):
        row = {"uuid": f"u{i}", "model": "tiny", "gen_input_configs": None, "instruction": ins, "response": res,
               "conversations": [], "messages": [], "turns": 1, "category": None}
        if base is not None:
            row["base_output"] = base[i]
        rows.append(row)
    (root / "single").mkdir(parents=True)
    Dataset.from_list(rows, features=features).to_parquet(str(root / "single" / "train-00000-of-00001.parquet"))
    (root / "magpie_manifest.json").write_text(json.dumps({"model": {"id": "tiny"}}))
    return root


def reference_reward(rm_dir: Path, ins: str, res: str) -> float:
    """One pair at a time, no padding: what the reward model says about the rendered chat."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    text = tok.apply_chat_template([{"role": "user", "content": ins}, {"role": "assistant", "content": res}],
                                   tokenize=False)
    # (the original Llama-3 template appends the assistant header even without add_generation_prompt)
    assert text.startswith(tok.bos_token) and f"{res.strip()}<|eot_id|>" in text
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return float(model(input_ids=ids).logits[0, 0])


def test_reward_scores_match_unbatched_reference(tmp_path, tiny_rm):
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    step = step_class("reward")(ctx, model=str(tiny_rm), inference_batch=3)
    step.setup()
    # the end-of-turn token may equal the pad token: padding must not hide the last real token
    scores = step.score(PAIRS)
    step.close()
    assert scores[6:] == [None, None]
    for (ins, res), got in zip(PAIRS[:6], scores[:6], strict=True):
        assert got == pytest.approx(reference_reward(tiny_rm, ins, res), abs=1e-4)
    assert len({round(s, 6) for s in scores[:6]}) == 6


def test_reward_head_with_several_labels_and_no_score_is_refused(tmp_path, tiny_llama3):
    """Its first logit is not a reward: one line naming the fix (a one-label head, or a score output)."""
    tiny_reward_model(tiny_llama3, tmp_path / "multi", labels=3)
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    step = step_class("reward")(ctx, model=str(tmp_path / "multi"))
    with pytest.raises(ModelError, match=r"3 labels and no score output.*trust_remote_code") as err:
        step.setup()
    assert "\n" not in str(err.value)


def test_reward_step_through_runner_with_base_and_air_filter(tmp_path, tiny_rm):
    base = ["5.", "Leaves.", "Recursion is recursion.", "Hey.", "1, 2, 3.", "No.", "x", "y"]
    root = make_dir(tmp_path / "ds", PAIRS, base=base)
    tag_dataset(root, [{"reward": {"model": str(tiny_rm), "base_column": "base_output", "inference_batch": 4}}])
    t = pq.read_table(root / "single").to_pydict()
    assert t["reward_model"] == [str(tiny_rm)] * 6 + [None, None]
    assert t["instruct_reward"][6:] == [None, None] and t["base_reward"][7] is None
    for r, b, d in zip(t["instruct_reward"][:6], t["base_reward"][:6], t["reward_difference"][:6], strict=True):
        assert d == pytest.approx(r - b)
    info = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["reward"]
    assert info["counts"] == {"rows": 8, "scored": 6, "no_input": 2, "truncated": 0}
    schema = pq.read_schema(root / "single" / "train-00000-of-00001.parquet")
    assert str(schema.field("instruct_reward").type) == "double"

    air = tmp_path / "air.yaml"
    air.write_text("rules: [reward_difference > 0]\n")
    report = filter_dataset(root, str(air), tmp_path / "out")
    assert report.rows_out["single"] == sum(1 for d in t["reward_difference"] if d is not None and d > 0)


def test_reward_bad_input(tmp_path, tiny_llama3, tiny_rm):
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    with pytest.raises(RecipeError, match="unknown options"):
        step_class("reward")(ctx, model="x", temperature=0)
    with pytest.raises(RecipeError, match="inference_batch must be"):
        step_class("reward")(ctx, inference_batch=0)
    no_template = tmp_path / "rm-no-template"
    shutil.copytree(tiny_rm, no_template)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="no chat template"):
        step_class("reward")(ctx, model=str(no_template)).setup()
    with pytest.raises(ModelError, match="tag step 'reward'"):
        step_class("reward")(ctx, model=str(tmp_path / "missing-rm")).setup()
    # a reward_difference rule (Air) on a dataset without it says how to get it
    root = make_dir(tmp_path / "ds", PAIRS[:2])
    (tmp_path / "f.yaml").write_text("rules: [reward_difference > 0]\n")
    with pytest.raises(DatasetDirError, match=r"reward_difference.*base_column: COLUMN"):
        filter_dataset(root, str(tmp_path / "f.yaml"), tmp_path / "out")


def test_guard_prompt_formats(tmp_path, tiny_guard, tiny_llama3):
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    row = {"instruction": " How do I bake bread? ", "response": "Mix flour, water, yeast and salt."}
    step = step_class("safety")(ctx, model=str(tiny_guard))
    step.prepare(str(tiny_guard))
    assert step.used_format == "chat_template"
    prompt = step.prompt_for(row)
    # the moderation template and the built-in Llama-Guard-2 format agree, judging the agent's reply
    assert prompt == llama_guard_2_prompt(row["instruction"], row["response"], bos="<|begin_of_text|>")
    assert "S11: Sexual Content. \n<END UNSAFE CONTENT CATEGORIES>" in prompt
    assert "User: How do I bake bread?\n\nAgent: Mix flour" in prompt and prompt.endswith("categories. [/INST]")
    assert step.prompt_for({"instruction": None, "response": "x"}) is None
    plain = step_class("safety")(ctx, model=str(tiny_llama3))   # a chat model, not a guard: built-in format
    plain.prepare(str(tiny_llama3))
    assert plain.used_format == "llama-guard-2" and plain.prompt_for(row) == prompt
    with pytest.raises(ModelError, match="no moderation chat template"):
        step_class("safety")(ctx, model=str(tiny_llama3), prompt_format="template").prepare(str(tiny_llama3))
    with pytest.raises(RecipeError, match="prompt_format"):
        step_class("safety")(ctx, prompt_format="llama-guard-9")


def test_safety_verdicts_parsed(tmp_path, tiny_guard):
    answers = [{"match": "Agent: A1", "text": "safe"},
               {"match": "Agent: A2", "text": "unsafe\nS2"},
               {"match": "Agent: A3", "text": " Unsafe\nS1,S10 "},
               {"match": "Agent: A4", "text": "I cannot judge this."},
               {"match": "Agent: A5", "text": ""},
               {"match": "Agent: A6", "text": "safe", "finish_reason": "error"}]
    root = make_dir(tmp_path / "ds", [(f"Q{i}", f"A{i}") for i in range(1, 7)] + [(None, "A7")])
    opts = {"model": str(tiny_guard), "backend": "scripted",
            "backend_options": {"answers": write_answers(tmp_path / "g.jsonl", answers)}}
    tag_dataset(root, [{"safety": opts}])
    t = pq.read_table(root / "single").to_pydict()
    assert t["safety"] == ["safe", "unsafe", "unsafe", None, None, None, None]
    assert t["llama_guard_2"] == ["safe", "unsafe\nS2", "Unsafe\nS1,S10", "I cannot judge this.", None, None, None]
    g = str(tiny_guard)
    assert t["safety_generator"] == [g, g, g, g, None, None, None]
    info = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["safety"]
    assert info["counts"] == {"rows": 7, "tagged": 3, "unparseable": 1, "off_label": 1, "failed": 1, "no_input": 1}
    assert info["prompt_format"] == "chat_template"


def test_safety_real_transformers_guard(tmp_path, tiny_guard):
    """The real path on a tiny random guard: raw verdicts are noise; every row must be accounted for."""
    root = make_dir(tmp_path / "ds", PAIRS[:5])
    tag_dataset(root, [{"safety": {"model": str(tiny_guard), "max_new_tokens": 6}}])
    t = pq.read_table(root / "single").to_pydict()
    info = json.loads((root / "magpie_manifest.json").read_text())["tags"]["steps"]["safety"]
    c = info["counts"]
    assert c["rows"] == 5 and sum(v for k, v in c.items() if k != "rows") == 5
    assert c["tagged"] == sum(v is not None for v in t["safety"])
    assert all(v in (None, "safe", "unsafe") for v in t["safety"])
    assert sum(v is not None for v in t["llama_guard_2"]) == c["tagged"] + c["off_label"]
    assert info["backend"] == "transformers"
