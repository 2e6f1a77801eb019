"""tiny_model: seeded random-weight models built offline, cached atomically, ending their turns by themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from magpie_hub.chat.demo_models import QWEN_TOKENIZER_ENV, build_tiny_model, resolve_model
from magpie_hub.chat.format import load_chat_format
from magpie_hub.errors import ModelError

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " padded question \n"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}],
]
HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _mean_turn_length(path: Path, prompts: list[str], samples: int, max_new: int) -> tuple[float, float]:
    """Mean tokens until the first stop id at T=1 (no top-k), and the fraction of turns that ended."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    fmt = load_chat_format(str(path))
    lengths = []
    torch.manual_seed(0)
    for prompt in prompts:
        ids = torch.tensor([fmt.encode(prompt)] * samples)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, max_new_tokens=max_new, pad_token_id=fmt.stop_token_ids[0])
        for row in out[:, ids.shape[1]:].tolist():
            lengths.append(next((i + 1 for i, t in enumerate(row) if t in fmt.stop_token_ids), None))
    ended = [n for n in lengths if n is not None]
    return sum(ended) / max(1, len(ended)), len(ended) / len(lengths)


def test_llama3_own_template_renders_like_the_real_llama3_template(tiny_llama3):
    ours = AutoTokenizer.from_pretrained(build_tiny_model("llama3"))
    real = AutoTokenizer.from_pretrained(tiny_llama3)
    assert ours.chat_template != real.chat_template  # the package's template, not the Apr-2024 format's
    for conv in CONVERSATIONS:
        a = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert a == real.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        # the Apr-2024 Meta template appends the assistant header even without add_generation_prompt
        b = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        assert b + HEADER == real.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert ours.get_vocab() == real.get_vocab()


def test_llama3_folder_loads_offline_with_llama3_tokens(tiny_llama3):
    tok = AutoTokenizer.from_pretrained(tiny_llama3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok)
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok.convert_ids_to_tokens(tok.encode(special, add_special_tokens=False)) == [special]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    gen = json.loads((tiny_llama3 / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == eot and tok.convert_tokens_to_ids("<|end_of_text|>") in gen["eos_token_id"]
    info = json.loads((tiny_llama3 / "magpie_tiny.json").read_text())
    assert info["random_weights"] is True and info["family"] == "llama3"
    fmt = load_chat_format(str(tiny_llama3))
    assert fmt.pre_query == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert fmt.bos_in_template and fmt.encode(fmt.pre_query).count(tok.bos_token_id) == 1


def test_llama3_turns_end_by_themselves(tiny_llama3):
    fmt = load_chat_format(str(tiny_llama3))
    mean, ended = _mean_turn_length(tiny_llama3, [fmt.user_prompt([]), fmt.assistant_prompt([], "Hello?")],
                                    samples=24, max_new=240)
    assert ended >= 0.9 and 12 <= mean <= 90, (mean, ended)


def test_qwen_uses_the_real_tokenizer_and_template(tiny_qwen, fixtures_dir):
    fmt, real = load_chat_format(str(tiny_qwen)), load_chat_format(str(fixtures_dir / "qwen2.5-instruct"))
    for key in ("pre_query", "post_query", "follow_up", "stop", "stop_token_ids", "bos_in_template"):
        assert getattr(fmt, key) == getattr(real, key), key
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(fmt.tokenizer)
    assert json.loads((tiny_qwen / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    mean, ended = _mean_turn_length(tiny_qwen, [fmt.user_prompt([])], samples=12, max_new=160)
    assert ended >= 0.8 and 8 <= mean <= 90, (mean, ended)


def test_cache_is_reused_and_builds_are_deterministic(tiny_llama3, fixtures_dir, tmp_path):
    weights = tiny_llama3 / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = build_tiny_model("llama3", chat_template_from=fixtures_dir / "llama-3-8b-instruct")
    assert again == tiny_llama3 and weights.stat().st_mtime_ns == stamp
    fresh = build_tiny_model("llama3", chat_template_from=fixtures_dir / "llama-3-8b-instruct", cache_dir=tmp_path)
    assert fresh.parent == tmp_path and fresh.name == tiny_llama3.name
    assert (fresh / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (fresh / "tokenizer.json").read_bytes() == (tiny_llama3 / "tokenizer.json").read_bytes()
    other = build_tiny_model("llama3", chat_template_from=fixtures_dir / "llama-3-8b-instruct", seed=1,
                             cache_dir=tmp_path)
    assert other != fresh and (other / "model.safetensors").read_bytes() != weights.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_two_processes_building_at_once_share_one_valid_copy(tmp_path):
    code = ("import sys; from magpie_hub.chat.demo_models import build_tiny_model; "
            "print(build_tiny_model('llama3', seed=7, cache_dir=sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    built = Path(paths.pop())
    assert (built / "magpie_tiny.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [built.name]
    AutoModelForCausalLM.from_pretrained(built)


def test_resolve_model_and_errors(tiny_qwen, fixtures_dir, monkeypatch):
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model("tiny:llama3") == str(build_tiny_model("llama3"))
    qwen_dir = fixtures_dir / "qwen2.5-instruct"
    assert resolve_model(f"tiny:qwen2.5:{qwen_dir}") == str(tiny_qwen)
    monkeypatch.setenv(QWEN_TOKENIZER_ENV, str(qwen_dir))
    assert resolve_model("tiny:qwen2.5") == str(tiny_qwen)
    monkeypatch.delenv(QWEN_TOKENIZER_ENV)
    with pytest.raises(ModelError, match=QWEN_TOKENIZER_ENV):
        resolve_model("tiny:qwen2.5")
    with pytest.raises(ModelError, match="tokenizer_from"):
        build_tiny_model("qwen2.5")
    with pytest.raises(ModelError, match="unknown tiny model"):
        resolve_model("tiny:gpt2")
    with pytest.raises(ModelError, match="llama3 or qwen2.5"):
        build_tiny_model("gpt2")
    with pytest.raises(ModelError, match="does not exist"):
        build_tiny_model("qwen2.5", tokenizer_from=fixtures_dir / "nope")
