"""MAGPIE fidelity (issue 10): official pre-query strings on request, role-header stops, released column
shapes, follow-up sampling, verbatim judge prompts, the paper's Table 5 filters.

The official strings below are copied from magpie-align/magpie @ b734a36818e4ba7ef7f0f582fc55f7e860407d26
(configs/model_configs.json, exp/str_utils.py), independently of magpie_hub/chat/official.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from magpie_hub import pipeline
from magpie_hub.chat.format import ChatFormat, load_chat_format
from magpie_hub.chat.official import OFFICIAL_PRE_QUERY, official_family, resolve_pre_query
from magpie_hub.dataset.schema import build_features
from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import get_backend
from magpie_hub.generate.backends.base import SamplingParams
from magpie_hub.generate.engine import CleanupOptions, ConversationEngine, ConversationSpec
from magpie_hub.recipe.load import load_recipe

DATA = Path(__file__).parent / "data"

# (fixture folder, family, the official pre_query_template as written in configs/model_configs.json)
OFFICIAL = [
    ("tokenizers/llama-3-8b-instruct", "llama-3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"),
    ("official/llama-3.1", "llama-3.1", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"),
    ("official/qwen2", "qwen2", "<|im_start|>user\n"),
    ("tokenizers/qwen2.5-instruct", "qwen2.5", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                               "helpful assistant.<|im_end|>\n<|im_start|>user\n"),
    ("tokenizers/gemma-2-it", "gemma-2", "<bos><start_of_turn>user\n\n"),
    ("tokenizers/phi-3-mini-4k-instruct", "phi-3", "<s> <|user|>\n"),
    ("tokenizers/mistral-7b-instruct-v0.2", "mistral", "<s> [INST] "),
]
DATE = "26 Jul 2024"


def _format(folder: str) -> ChatFormat:
    return load_chat_format(str(DATA / folder), allow_config_only=True, date_string=DATE)


@pytest.mark.parametrize(("folder", "family", "official"), OFFICIAL, ids=[f for _, f, _ in OFFICIAL])
def test_official_and_derived_pre_query(folder, family, official):
    fmt = _format(folder)
    assert official_family(folder) == family
    assert resolve_pre_query(fmt, "official", model=folder) == official            # byte for byte
    assert resolve_pre_query(fmt, f"official:{family}", model="some/other-model") == official
    # derived = the model's own template rendering of a first user turn, cut at the user text
    rendered = fmt.tokenizer.apply_chat_template([{"role": "user", "content": "QQQ"}], tokenize=False,
                                                 add_generation_prompt=True, date_string=DATE)
    assert resolve_pre_query(fmt, "derived") is None and fmt.pre_query == rendered.split("QQQ")[0]
    assert fmt.user_prompt([]) == fmt.pre_query
    assert resolve_pre_query(fmt, "Write a question:\n") == "Write a question:\n"


def test_where_derived_and_official_differ_and_drop_default_system():
    differ = {family for folder, family, official in OFFICIAL if _format(folder).pre_query != official}
    assert differ == {"llama-3.1", "qwen2", "gemma-2", "phi-3", "mistral"}
    # the injected default system block (Llama-3.1 date block, Qwen2 default prompt) is what makes them differ
    for folder, family in (("official/llama-3.1", "llama-3.1"), ("official/qwen2", "qwen2")):
        fmt = _format(folder)
        assert resolve_pre_query(fmt, "derived", drop_default_system=True) == OFFICIAL_PRE_QUERY[family][0]
    llama3 = _format("tokenizers/llama-3-8b-instruct")    # nothing injected: nothing dropped
    assert llama3.pre_query_without_default_system() == llama3.pre_query
    with pytest.raises(RecipeError, match="official:FAMILY"):
        resolve_pre_query(llama3, "official", model="acme/unknown-chat")
    with pytest.raises(RecipeError, match="unknown family"):
        resolve_pre_query(llama3, "official:llama-9", model="x")


def test_category_system_pre_query_is_the_official_one():
    from magpie_hub.recipe.prompts import BUILTIN_CATEGORY_PROMPTS

    # configs/model_configs.json, Meta-Llama-3-8B-Instruct "pre_query_template_math"
    official_math = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are an AI assistant designed "
                     "to provide helpful, step-by-step guidance on solving math problems. The user will ask you a wide "
                     "range of complex mathematical questions.\nYour purpose is to assist users in understanding "
                     "mathematical concepts, working through equations, and arriving at the correct solutions."
                     "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    fmt = _format("tokenizers/llama-3-8b-instruct")
    assert fmt.pre_query_system(BUILTIN_CATEGORY_PROMPTS["math"]) == official_math


def test_template_date_is_pinned_and_settable():
    a, b = _format("official/llama-3.1"), _format("official/llama-3.1")
    assert f"Today Date: {DATE}\n" in a.pre_query and a.pre_query == b.pre_query
    assert f"Today Date: {DATE}" in a.assistant_prompt([], "hi")     # responses render the same date
    today = load_chat_format(str(DATA / "official/llama-3.1"), allow_config_only=True)
    assert today.date_string in today.pre_query and today.user_prompt([]) == today.pre_query


# -- stops: a role header never enters a turn ------------------------------------------------------------
def _header_model(tiny_llama3: Path, out: Path) -> tuple[Path, list[int]]:
    """The tiny Llama-3 model rewired into a deterministic successor machine: attention and MLP write nothing,
    so the last hidden state is the current token's one-hot embedding, and the LM head maps each chain token
    to the next with a logit gap of 80 (at T=1 the next token has probability 1 - 1e-30). From the prompt's
    last token ("\\n") it writes "Hello world<|start_header_id|>assistant<|end_header_id|><|eot_id|>":
    an instruction that runs into a role header."""
    shutil.copytree(tiny_llama3, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    fmt = load_chat_format(str(out))
    tok = fmt.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    header = [tok.convert_tokens_to_ids(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]
    chain = [ids("\n\n")[-1], *ids("Hello world"), header[0], *ids("assistant"), header[1], header[2]]
    assert len(set(chain[:-1])) == len(chain) - 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for dim, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
            model.model.embed_tokens.weight[cur, dim] = 1.0
            model.lm_head.weight[nxt, dim] = 10.0
    model.save_pretrained(out)
    # generation_config: only <|eot_id|> ends a turn there, so the header stops come from the template alone
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [header[2]]}))
    return out, header


def test_local_backend_instruction_never_keeps_a_role_header(tiny_llama3, tmp_path):
    path, header = _header_model(tiny_llama3, tmp_path / "header-model")
    fmt = load_chat_format(str(path))
    assert {header[0], header[1]} <= set(fmt.role_marker_ids) and header[0] not in fmt.stop_token_ids
    backend = get_backend("transformers", str(path), dtype="float32", batch_size=4)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, seed=0)
    specs = [ConversationSpec(config="c", index=i, uuid=f"u{i}", turns=1, category=None, system_prompt=None,
                              instruction_params=params, response_params=params) for i in range(3)]
    engine = ConversationEngine(backend, fmt, cleanup=CleanupOptions(), max_attempts=1, concurrency=4)

    async def run():
        async with backend:
            return [c async for c in engine.run(specs)]

    convs = asyncio.run(run())
    assert len(convs) == 3, engine.dropped
    for conv in convs:
        instruction = conv.turns[0][0]
        assert instruction == "Hello world" and "assistant" not in instruction
        assert conv.finish_reasons[0] == "stop"


# -- columns: multi-turn shape, released schema, follow-up sampling ---------------------------------------
RECIPE = {
    "name": "fidelity", "model": "tiny:llama3", "backend": "dummy", "seed": 3,
    "instruction_sampling": [{"temperature": 1.25, "top_p": 0.99}],
    "max_new_tokens": {"instruction": 24, "response": 24},
    "configs": {"mt": {"rows": 4, "turns": 2}, "official": {"rows": 2, "pre_query": "official"}},
}

# Magpie-Align/Magpie-Llama-3.1-Pro-MT-500K-v0.1, dataset card `dataset_info` (the columns a build also has)
RELEASED_MT = datasets.Features({
    "uuid": datasets.Value("string"), "model": datasets.Value("string"),
    "gen_input_configs": {"temperature": datasets.Value("float64"), "top_p": datasets.Value("float64"),
                          "input_generator": datasets.Value("string"), "seed": datasets.Value("null"),
                          "pre_query_template": datasets.Value("string")},
    "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    "instruction": datasets.Value("string"), "response": datasets.Value("string"),
    "instruction_2": datasets.Value("string"), "response_2": datasets.Value("string"),
})


def test_multi_turn_columns_released_schema_and_follow_up_sampling(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "ds"
    pipeline.build(path, out=out)
    mt = datasets.load_dataset(str(out), "mt", split="train")
    assert mt.features == build_features(2)
    for row in mt:
        values = [m["value"] for m in row["conversations"]]
        assert [row["instruction"], row["response"], row["instruction_2"], row["response_2"]] == values
        assert row["gen_response_configs"]["engine"] == "dummy" and row["gen_response_configs"]["max_tokens"] == 24
        assert row["gen_response_configs"]["temperature"] == 0.0 and "<|eot_id|>" in row["gen_response_configs"]["stop"]
        assert len(row["finish_reasons"]) == 4
    released = datasets.Dataset.from_list([{
        "uuid": "r0", "model": "meta-llama/Meta-Llama-3.1-70B-Instruct",
        "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "input_generator": "m", "seed": None,
                              "pre_query_template": "<|begin_of_text|>"},
        "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}] * 2,
        "instruction": "a", "response": "b", "instruction_2": "a", "response_2": "b"}], features=RELEASED_MT)
    both = datasets.concatenate_datasets([released, mt])            # no cast
    assert len(both) == 5 and both[0]["gen_input_configs"]["seed"] is None
    assert both[1]["gen_input_configs"]["seed"] == 3 and both[4]["instruction_2"] == mt[3]["instruction_2"]
    # `official` pre-query recorded per row; follow-up turns sampled at T=1, top_p=1 (gen_mt.py defaults)
    official = pq.read_table(out / "official").to_pylist()
    assert {r["gen_input_configs"]["pre_query_template"] for r in official} == {OFFICIAL_PRE_QUERY["llama-3"][0]}
    recipe = load_recipe(path)
    assert recipe.generation_settings("mt")["follow_up_sampling"] == {"temperature": 1.0, "top_p": 1.0}
    assert "follow_up_sampling" not in recipe.generation_settings("official")


def test_follow_up_params_reach_the_backend():
    """Turn 2's instruction request carries the follow-up sampling, turn 1's the row's mix."""
    seen = []

    class Recorder:
        async def generate(self, request):
            seen.append((request.role, request.params.temperature, request.params.top_p))
            from magpie_hub.generate.backends.base import GenerationResult
            return GenerationResult(text="What is a prime number?" if request.role == "user" else "A number.",
                                    finish_reason="stop", generated_tokens=5)

    fmt = _format("tokenizers/llama-3-8b-instruct")
    mix = SamplingParams(temperature=1.25, top_p=0.99, max_new_tokens=16, seed=0)
    follow = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0)
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
    spec = ConversationSpec(config="c", index=0, uuid="u", turns=3, category=None, system_prompt=None,
                            instruction_params=mix, response_params=greedy, follow_up_params=follow,
                            pre_query="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    engine = ConversationEngine(Recorder(), fmt, max_attempts=1)
    conv = asyncio.run(engine.conversation(spec))
    assert conv is not None and len(conv.turns) == 3
    assert seen == [("user", 1.25, 0.99), ("assistant", 0.0, 1.0), ("user", 1.0, 1.0), ("assistant", 0.0, 1.0),
                    ("user", 1.0, 1.0), ("assistant", 0.0, 1.0)]


def test_recipes_reproducing_releases_stop_at_newline_and_say_so():
    root = Path(__file__).resolve().parents[1] / "builders"
    for name in ("magpie-pro.yaml", "magpie-air.yaml", "magpie-pro-mt.yaml"):
        text = (root / name).read_text()
        recipe = load_recipe(root / name)
        assert recipe.cleanup.newline_stop is True, name
        assert "official" in text and "newline" in text, name


# -- templates --json: another tool rebuilds an N-turn prompt from the JSON alone (the README snippet) ----
def _user_prompt(t: dict, turns: list[tuple[str, str]], system: str | None = None) -> str:
    text = t["pre_query"] if system is None else t["pre_query_system"]
    for user, reply in turns:                      # a past reply in its history form
        text += user + t["history_post_query"] + reply + t["follow_up"]
    return text                                    # the model writes the next user turn; stop at user_stop


def _assistant_prompt(t: dict, turns: list[tuple[str, str]], user: str, system: str | None = None) -> str:
    return _user_prompt(t, turns, system) + user + t["post_query"]   # stop at assistant_stop


@pytest.mark.parametrize("folder", ["tokenizers/vicuna", "templates/deepseek-r1-distill-qwen",
                                    "tokenizers/llama-3-8b-instruct", "official/llama-3.1", "templates/qwen3"])
def test_json_rebuilds_n_turn_prompts(folder):
    fmt = _format(folder)
    t = json.loads(json.dumps(fmt.to_dict()))
    turns = [("Name a prime.", "Seven."), ("And another?", "Eleven.")]
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    rendered = fmt.tokenizer.apply_chat_template([*msgs, {"role": "user", "content": "Why?"}], tokenize=False,
                                                 add_generation_prompt=True, date_string=DATE)
    assert _assistant_prompt(t, turns, "Why?") == rendered
    assert _user_prompt(t, turns) == fmt.user_prompt(turns)
    if t["reply_gap"]:                              # Vicuna: the model writes " " itself after post_query
        assert t["history_post_query"] == t["post_query"] + t["reply_gap"]


def test_tgi_text_is_cut_at_a_special_role_token():
    """TGI decodes generated_text without special tokens; details.tokens still shows the header."""
    from types import SimpleNamespace as T

    from magpie_hub.generate.backends.http.tgi import cut_at_special_stop

    tokens = [T(text="Hello", special=False), T(text=" world", special=False),
              T(text="<|start_header_id|>", special=True), T(text="assistant", special=False),
              T(text="<|end_header_id|>", special=True), T(text="\n\nSure", special=False)]
    stops = ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
    assert cut_at_special_stop("Hello worldassistant\n\nSure", tokens, stops) == ("Hello world", True)
    assert cut_at_special_stop("Hello world", tokens[:2], stops) == ("Hello world", False)
    assert cut_at_special_stop("plain", None, stops) == ("plain", False)
