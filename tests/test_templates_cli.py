"""`magpie-hub templates`: one JSON object with the issue's keys, the round-trip invariant on template
folders that are not among the fixtures, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from magpie_hub.chat.config_tokenizer import tokenizer_from_config
from magpie_hub.cli import main

NEW_FAMILIES = Path(__file__).parent / "data" / "templates"
KEYS = ["pre_query", "pre_query_system", "post_query", "follow_up", "history_post_query", "reply_gap", "stop",
        "user_stop", "assistant_stop", "bos_in_template"]


def _json_of(capsys, *args: str) -> dict:
    main(["templates", *args, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one JSON object on one line
    data = json.loads(out)
    assert list(data) == KEYS
    return data


@pytest.mark.parametrize("family", sorted(p.name for p in NEW_FAMILIES.iterdir() if p.is_dir()))
def test_json_satisfies_round_trip_on_new_families(family, capsys):
    folder = NEW_FAMILIES / family
    data = _json_of(capsys, str(folder))
    tok = tokenizer_from_config(folder, train=False)  # independent rendering of the same template

    def render(msgs):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    u1, a1, u2 = "Name a prime number.", "Seven is prime.", "Name another one."
    one = render([{"role": "user", "content": u1}])
    assert one == data["pre_query"] + u1 + data["post_query"]
    two = render([{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": u2}])
    head = data["pre_query"] + u1
    tail = a1 + data["follow_up"] + u2 + data["post_query"]
    assert two.startswith(head) and two.endswith(tail)
    if family != "deepseek-r1-distill-qwen":  # R1 prompts with "<think>\n" but stores past replies without it
        assert two == head + data["post_query"] + tail
    assert data["stop"] and all(isinstance(s, str) and s for s in data["stop"])
    assert data["bos_in_template"] == bool(tok.bos_token and data["pre_query"].startswith(tok.bos_token))
    system = "Answer in one word."
    with_system = _json_of(capsys, str(folder), "--system", system)
    assert system in with_system["pre_query_system"]
    assert render([{"role": "system", "content": system}, {"role": "user", "content": u1}]) == (
        with_system["pre_query_system"] + u1 + data["post_query"])


def test_config_only_fixture_and_tiny_model(fixtures_dir, capsys):
    data = _json_of(capsys, str(fixtures_dir / "llama-3-8b-instruct"))
    assert data["pre_query"] == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert data["stop"][:2] == ["<|eot_id|>", "<|end_of_text|>"] and data["bos_in_template"] is True
    assert {"<|start_header_id|>", "<|end_header_id|>"} <= set(data["user_stop"])   # role headers stop a turn
    tiny = _json_of(capsys, "tiny:llama3")
    assert tiny["pre_query"] == data["pre_query"] and tiny["post_query"] == data["post_query"]


def test_cli_subprocess_json_and_table(fixtures_dir):
    proc = run_cli("templates", str(fixtures_dir / "qwen2.5-instruct"), "--json", "--system", "Be kind.", check=True)
    data = json.loads(proc.stdout)
    assert data["pre_query_system"] == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
    assert data["pre_query"].startswith("<|im_start|>system\nYou are Qwen")
    table = run_cli("templates", str(fixtures_dir / "mistral-7b-instruct-v0.2"), check=True)
    assert "pre_query" in table.stdout and "[INST]" in table.stdout


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_errors(fixtures_dir, tmp_path):
    _assert_one_line_error(run_cli("templates", str(tmp_path / "nope"), "--json"), "does not exist")
    _assert_one_line_error(run_cli("templates", str(fixtures_dir / "gemma-2-it"), "--json", "--system", "x"),
                           "does not accept a system prompt", "drop the system prompt")
    folder = tmp_path / "no-template"
    shutil.copytree(fixtures_dir / "mistral-7b-instruct-v0.2", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _assert_one_line_error(run_cli("templates", str(folder), "--json"), "no chat template")
    _assert_one_line_error(run_cli("templates", "someone/not-downloaded-model", "--json"),
                           "HF_HUB_OFFLINE", "hf download")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-template"]  # nothing written


def test_broken_vocabulary_is_an_error_not_a_silent_fallback(fixtures_dir, tmp_path, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(fixtures_dir / "phi-3-mini-4k-instruct", folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        main(["templates", str(folder), "--json"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: cannot load the tokenizer")
