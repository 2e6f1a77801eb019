"""chat_format: MAGPIE pieces derived from each model's own chat template, checked against the template.

Every expected string below is rendered independently with ``tokenizer.apply_chat_template`` (or taken
from the MAGPIE method's official pre-query strings), never from chat_format itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from magpie_hub.chat.config_tokenizer import tokenizer_from_config
from magpie_hub.chat.format import ChatFormat, load_chat_format
from magpie_hub.errors import ChatFormatError, ModelError
from magpie_hub.models import load_tokenizer

FIXTURE_NAMES = ["deepseek-coder-6.7b-instruct", "gemma-2-it", "llama-3-8b-instruct", "mistral-7b-instruct-v0.2",
                 "phi-3-mini-4k-instruct", "qwen2.5-instruct", "vicuna"]
CONFIG_ONLY = {"deepseek-coder-6.7b-instruct", "gemma-2-it", "llama-3-8b-instruct", "vicuna"}
NEW_FAMILIES = Path(__file__).parent / "data" / "templates"
NEW_NAMES = sorted(p.name for p in NEW_FAMILIES.iterdir() if p.is_dir())
U = ["What is the capital of France?", "And of Italy?", "Which one is bigger?"]
A = ["The capital of France is Paris.", "Rome is the capital of Italy."]
SYSTEM = "You are a terse geography tutor."


@pytest.fixture(scope="module")
def formats(fixtures_dir) -> dict[str, ChatFormat]:
    """One ChatFormat per fixture folder; config-only folders get a locally trained tiny BPE tokenizer."""
    out = {}
    for name in FIXTURE_NAMES:
        folder = fixtures_dir / name
        if name in CONFIG_ONLY:
            out[name] = ChatFormat(tokenizer_from_config(folder), name)
        else:
            out[name] = load_chat_format(str(folder))
    for name in NEW_NAMES:
        out[name] = ChatFormat(tokenizer_from_config(NEW_FAMILIES / name, train=False), name)
    return out


def _render(fmt: ChatFormat, messages: list[dict], generation: bool = True) -> str:
    return fmt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             date_string=fmt.date_string)


def _conversation(turns: int, system: str | None, reply_gap: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i in range(turns):
        msgs.append({"role": "user", "content": U[i]})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": reply_gap + A[i]})
    return msgs


@pytest.mark.parametrize("name", FIXTURE_NAMES + NEW_NAMES)
@pytest.mark.parametrize("turns", [2, 3])
@pytest.mark.parametrize("with_system", [False, True])
def test_round_trip_invariant(formats, name, turns, with_system):
    """pre + U1 + post + A1 + follow_up + U2 + post == the template's own rendering, byte for byte.

    A1 is the reply as the model writes it after post_query: for templates that re-insert a gap between
    the generation prompt and the reply (Vicuna: ``" ASSISTANT: " + reply.strip()``), that includes the
    gap. Templates whose history form of a reply is not the generation prompt (DeepSeek-R1 prompts with
    ``<think>\\n`` but stores replies without it) use ``history_post_query`` for past turns."""
    fmt = formats[name]
    if with_system and not fmt.supports_system:
        with pytest.raises(ChatFormatError, match="does not accept a system prompt"):
            fmt.pre_query_system(SYSTEM)
        return
    if with_system and not fmt.system_first:  # Mistral-Nemo: the system prompt joins the LAST user turn
        assert name == "mistral-nemo"
        conv = _conversation(turns, SYSTEM, "")
        history = [(U[i], A[i]) for i in range(turns - 1)]
        assert fmt.assistant_prompt(history, U[turns - 1], system=SYSTEM) == _render(fmt, conv)
        assert fmt.user_prompt(history, system=SYSTEM).endswith(f"[INST]{SYSTEM}\n\n")
        return
    gap = fmt.reply_gap or ""
    past = fmt.post_query if fmt.reply_gap is not None else fmt.history_post_query
    text = fmt.pre_query_system(SYSTEM) if with_system else fmt.pre_query
    for i in range(turns):
        text += U[i]
        text += (past + gap + A[i] + fmt.follow_up) if i < turns - 1 else fmt.post_query
    expected = _render(fmt, _conversation(turns, SYSTEM if with_system else None, gap))
    assert text == expected
    # the prompts the generator uses render through the template and agree with the pieces
    history = [(U[i], gap + A[i]) for i in range(turns - 1)]
    system = SYSTEM if with_system else None
    assert fmt.assistant_prompt(history, U[turns - 1], system=system) == expected
    user_prompt = fmt.user_prompt(history, system=system)
    assert expected.startswith(user_prompt) and expected[len(user_prompt):].startswith(U[turns - 1])


def test_plain_invariant_holds_where_history_matches_generation_prompt(formats):
    """The issue's literal invariant (no gap, no history form) holds for all but Vicuna and DeepSeek-R1."""
    exact = [n for n, f in formats.items() if f.history_post_query == f.post_query]
    assert set(formats) - set(exact) == {"vicuna", "deepseek-r1-distill-qwen"}
    assert formats["vicuna"].reply_gap == " " and formats["vicuna"].post_query == " ASSISTANT:"
    r1 = formats["deepseek-r1-distill-qwen"]
    assert r1.post_query == "<｜Assistant｜><think>\n" and r1.history_post_query == "<｜Assistant｜>"


def test_official_strings(formats):
    """magpie-method.md: Llama-3 and Qwen2.5 match exactly; where the official hand-written string
    disagrees with the model's own template, the template wins."""
    assert formats["llama-3-8b-instruct"].pre_query == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert formats["llama-3-8b-instruct"].follow_up.endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert formats["qwen2.5-instruct"].pre_query == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n")
    # Mistral-7B-Instruct-v0.2's template renders "<s>[INST] " (no space after <s>), not the official "<s> [INST] "
    assert formats["mistral-7b-instruct-v0.2"].pre_query == "<s>[INST] "
    assert formats["mistral-7b-instruct-v0.2"].pre_query != "<s> [INST] "
    # Gemma-2: "\n" not "\n\n"; Phi-3: no "<s> " (the tokenizer adds BOS); Vicuna preset: " USER: "
    assert formats["gemma-2-it"].pre_query == "<bos><start_of_turn>user\n"
    assert formats["phi-3-mini-4k-instruct"].pre_query == "<|user|>\n"
    assert formats["vicuna"].pre_query.endswith("questions. USER: ")


def test_default_system_prompt_is_part_of_pre_query_and_replaced_by_a_given_one(formats):
    qwen = formats["qwen2.5-instruct"]
    assert "You are Qwen" in qwen.pre_query
    with_system = qwen.pre_query_system(SYSTEM)
    assert with_system == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert "You are Qwen" not in with_system
    deepseek = formats["deepseek-coder-6.7b-instruct"]
    assert "Deepseek Coder model" in deepseek.pre_query
    assert "Deepseek Coder model" not in deepseek.pre_query_system(SYSTEM)


@pytest.mark.parametrize("name", ["gemma-2-it", "mistral-7b-instruct-v0.2"])
def test_templates_without_system_role_work_until_a_system_prompt_is_asked(formats, name):
    fmt = formats[name]
    assert fmt.supports_system is False
    assert fmt.user_prompt([(U[0], A[0])]).startswith(fmt.pre_query)
    for call in (lambda: fmt.pre_query_system(SYSTEM), lambda: fmt.user_prompt([], system=SYSTEM),
                 lambda: fmt.assistant_prompt([], U[0], system=SYSTEM), lambda: fmt.to_dict(system=SYSTEM)):
        with pytest.raises(ChatFormatError, match="drop the system prompt"):
            call()


def test_system_prompt_merged_into_a_user_turn(formats):
    """Gemma-3 prefixes the first user turn; Mistral-Nemo puts the system prompt in the LAST user turn."""
    assert formats["gemma-3"].pre_query_system(SYSTEM) == f"<bos><start_of_turn>user\n{SYSTEM}\n\n"
    nemo = formats["mistral-nemo"]
    assert nemo.user_prompt([(U[0], A[0])], system=SYSTEM) == f"<s>[INST]{U[0]}[/INST]{A[0]}</s>[INST]{SYSTEM}\n\n"


def test_trimming_template_history_renders_through_the_template(formats):
    """Llama-3 trims message text: user_prompt must match the template, not naive concatenation."""
    fmt = formats["llama-3-8b-instruct"]
    history = [("  padded question \n", "\n padded answer  ")]
    naive = fmt.pre_query + history[0][0] + fmt.post_query + history[0][1] + fmt.follow_up
    rendered = _render(fmt, [{"role": "user", "content": history[0][0]},
                             {"role": "assistant", "content": history[0][1]},
                             {"role": "user", "content": U[1]}])
    assert fmt.user_prompt(history) == rendered[:rendered.index(U[1])]
    assert fmt.user_prompt(history) != naive


def test_thinking_blocks_are_dropped_from_history_like_the_template_does(formats):
    for name in ("qwen3", "deepseek-r1-distill-qwen"):
        fmt = formats[name]
        prompt = fmt.user_prompt([(U[0], "<think>\nscratch work\n</think>\n\n" + A[0])])
        assert "scratch work" not in prompt and A[0] in prompt


def test_stops_and_stop_token_ids(formats, fixtures_dir):
    llama = load_chat_format(str(fixtures_dir / "llama-3-8b-instruct"), allow_config_only=True)
    assert llama.user_stop[0] == "<|eot_id|>" and llama.assistant_stop[0] == "<|eot_id|>"
    assert llama.has_vocabulary is False
    assert set(llama.stop_token_ids) == {128009, 128001}  # the config's real ids + generation_config eos
    # every special token of the role headers stops a turn too (the official Llama-3 config: 128006 / 128007)
    assert llama.role_marker_ids == (128006, 128007, 128000)
    assert llama.user_stop[:2] == ("<|eot_id|>", "<|end_of_text|>")
    assert {"<|start_header_id|>", "<|end_header_id|>"} <= set(llama.user_stop) & set(llama.assistant_stop)
    qwen = formats["qwen2.5-instruct"]
    assert qwen.stop == ("<|im_end|>", "<|im_start|>") and set(qwen.stop_token_ids) == {151645, 151643}
    assert qwen.role_marker_ids == (151644,)
    mistral = formats["mistral-7b-instruct-v0.2"]   # v0.2's [INST] is plain text: stopped on text, not on ids
    assert mistral.user_stop == ("[/INST]", "</s>", "<s>") and mistral.assistant_stop == ("</s>", "<s>")
    assert mistral.stop_token_ids == (2,) and mistral.role_marker_ids == (1,)
    deepseek = load_chat_format(str(fixtures_dir / "deepseek-coder-6.7b-instruct"), allow_config_only=True)
    assert deepseek.user_stop[0] == "### Response:" and deepseek.assistant_stop == ("<|EOT|>", "<｜begin▁of▁sentence｜>")
    assert 32021 in deepseek.stop_token_ids
    assert formats["gemma-2-it"].stop[0] == "<end_of_turn>"
    assert formats["phi-3-mini-4k-instruct"].assistant_stop[0] == "<|end|>"
    assert formats["deepseek-r1-distill-qwen"].user_stop[0] == "<｜Assistant｜>"


def test_bos_in_template_and_encode_never_doubles_bos(formats):
    assert {n for n, f in formats.items() if f.bos_in_template} >= {
        "llama-3-8b-instruct", "mistral-7b-instruct-v0.2", "deepseek-coder-6.7b-instruct", "gemma-2-it"}
    assert not formats["qwen2.5-instruct"].bos_in_template and not formats["phi-3-mini-4k-instruct"].bos_in_template
    mistral = formats["mistral-7b-instruct-v0.2"]
    ids = mistral.encode(mistral.pre_query + "Hello")
    assert ids[0] == mistral.tokenizer.bos_token_id and ids.count(mistral.tokenizer.bos_token_id) == 1


def test_to_dict_keys(formats):
    data = formats["phi-3-mini-4k-instruct"].to_dict(system=SYSTEM)
    assert list(data) == ["pre_query", "pre_query_system", "post_query", "follow_up", "history_post_query",
                          "reply_gap", "stop", "user_stop", "assistant_stop", "bos_in_template"]
    assert data["pre_query_system"] == f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n"
    assert formats["phi-3-mini-4k-instruct"].to_dict()["pre_query_system"] is None
    json.dumps(data)


def test_template_that_rewrites_text_or_drops_system_is_refused(fixtures_dir, tmp_path):
    tok = tokenizer_from_config(fixtures_dir / "vicuna", train=False)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ChatFormatError, match="verbatim"):
        ChatFormat(tok, "upper")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}"
                         "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    fmt = ChatFormat(tok, "drops-system")
    assert fmt.supports_system is False
    with pytest.raises(ChatFormatError, match="drops the system message"):
        fmt.pre_query_system(SYSTEM)


def test_missing_template_and_bad_inputs(fixtures_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(fixtures_dir / "phi-3-mini-4k-instruct", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatFormatError, match="no chat template"):
        load_chat_format(str(folder))
    with pytest.raises(ModelError, match="does not exist"):
        load_chat_format(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no tokenizer vocabulary"):
        load_tokenizer(str(fixtures_dir / "gemma-2-it"))
    with pytest.raises(ModelError, match="no tokenizer vocabulary"):
        load_chat_format(str(fixtures_dir / "llama-3-8b-instruct"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        load_chat_format("some-org/not-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="holds no tokenizer"):
        load_chat_format(str(tmp_path / "empty"))


def test_hub_id_from_the_offline_cache(fixtures_dir):
    """A Hub id already in the local cache loads offline; generation_config.json eos ids come from the cache."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / "models--magpie-test--qwen-cached"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(fixtures_dir / "qwen2.5-instruct", snapshot, dirs_exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("a" * 40)
    fmt = load_chat_format("magpie-test/qwen-cached")
    assert fmt.model == "magpie-test/qwen-cached" and fmt.has_vocabulary
    assert fmt.pre_query.startswith("<|im_start|>system\nYou are Qwen")
    assert set(fmt.stop_token_ids) == {151645, 151643}  # 151643 only from the cached generation_config.json


def test_date_in_template_is_pinned_per_format():
    """Llama-3.2 prints today's date: every prompt of one format uses the date fixed at derivation."""
    fmt = ChatFormat(tokenizer_from_config(NEW_FAMILIES / "llama-3.2", train=False), "llama-3.2")
    assert fmt.date_string in fmt.pre_query                        # the template really prints it
    fmt.date_string = "01 Jan 2000"                                 # as if the clock had moved on
    later = fmt.user_prompt([("Hi?", "Hello.")], system="Be brief.")
    assert "01 Jan 2000" in later and fmt.date_string in fmt.assistant_prompt([], "Hi?")
