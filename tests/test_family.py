"""The rest of the Magpie family (issue 14): preference (DPO) configs, responses from another model with
reasoning blocks split off, configs that start from existing rows (a directory, the local test Hub at a
published tag), base-model (URIAL) responses; the bad inputs; TRL's DPO trainer on a built config.

Tiny models only: the seeded random ``tiny:llama3``, a tiny random reward model (one label), an ArmoRM-style
``trust_remote_code`` model whose output has ``score``, the dummy / scripted backends, tests/hub_server.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import tiny_reward_model

from magpie_hub import pipeline
from magpie_hub.build.checkpoint import Checkpoint, PieceWriter
from magpie_hub.cli import main as cli_main
from magpie_hub.errors import MagpieError, RecipeError
from magpie_hub.generate.reasoning import DEFAULT_TAGS, ThinkTags, split_reasoning, think_tags
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import load_recipe

ARMO_CODE = '''
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"


@dataclass
class ArmoOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    score: torch.FloatTensor = None


class TinyArmo(LlamaPreTrainedModel):
    """ArmoRM's shape: several objectives, a score combining them; the last token, one sequence at a time."""

    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rewards = self.regression_layer(hidden[:, -1])
        return ArmoOutput(rewards=rewards, score=rewards.mean(-1, keepdim=True))
'''


@pytest.fixture(scope="module")
def tiny_rm(tiny_llama3, tmp_path_factory) -> Path:
    return tiny_reward_model(tiny_llama3, tmp_path_factory.mktemp("rm"), 1)


@pytest.fixture(scope="module")
def tiny_armo(tiny_llama3, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path_factory.mktemp("armo")
    (out / "modeling_tiny_armo.py").write_text(ARMO_CODE)
    spec = importlib.util.spec_from_file_location("modeling_tiny_armo", out / "modeling_tiny_armo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = AutoConfig.from_pretrained(tiny_llama3).to_dict()
    base.pop("model_type", None)
    config = module.TinyArmoConfig(**{**base, "num_labels": 3})
    torch.manual_seed(1)
    module.TinyArmo(config).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_tiny_armo.TinyArmoConfig",
                       "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmo"}
    (out / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(tiny_llama3).save_pretrained(out)
    return out


def recipe(path: Path, configs: dict, **top) -> Path:
    data = {"name": "family", "model": "tiny:llama3", "backend": "dummy", "seed": 3,
            "max_new_tokens": {"instruction": 24, "response": 24}, "concurrency": 4, "configs": configs, **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rows(out: Path, config: str) -> list[dict]:
    return pq.read_table(out / config).to_pylist()


# --------------------------------------------------------------------------------------------- preference

@pytest.fixture(scope="module")
def pref_dir(tiny_rm, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pref")
    rec = recipe(root / "r.yaml", {"pairs": {"rows": 6, "kind": "preference",
                                             "preference": {"k": 3, "reward": {"model": str(tiny_rm)}}}})
    pipeline.build(rec, out=root / "out")
    return root / "out"


def test_preference_config_chosen_has_the_highest_score(pref_dir, tiny_rm):
    got = rows(pref_dir, "pairs")
    assert len(got) == 6 and len({r["uuid"] for r in got}) == 6
    for r in got:
        assert len(r["responses"]) == len(r["scores"]) == 3
        best = max(range(3), key=lambda i: r["scores"][i])
        worst = min(range(3), key=lambda i: r["scores"][i])
        assert r["chosen_score"] == max(r["scores"]) and r["rejected_score"] == min(r["scores"])
        assert r["chosen"] == [{"role": "assistant", "content": r["responses"][best]}]
        assert r["rejected"] == [{"role": "assistant", "content": r["responses"][worst]}]
        assert r["prompt"] == [{"role": "user", "content": r["instruction"]}]
        assert r["margin"] == pytest.approx(r["chosen_score"] - r["rejected_score"]) and r["margin"] > 0
        assert r["reward_model"] == str(tiny_rm)
    manifest = json.loads((pref_dir / MANIFEST).read_text())
    entry = manifest["configs"]["pairs"]
    assert entry["kind"] == "preference" and entry["preference"]["k"] == 3
    assert entry["preference"]["temperature"] == 0.8
    assert entry["preference"]["margins"]["rows"] == 6 and entry["preference"]["margins"]["min"] > 0
    assert "| pairs | 3 | 0.8 |" in (pref_dir / "README.md").read_text()


def test_preference_build_resumes_from_the_build_checkpoint_exactly(pref_dir, tiny_rm, tmp_path):
    """A run stopped after 3 rows (their checkpoint lines kept) resumes: those 3 are reused as written
    (row 0 carries a marker to prove it), the other 3 generated and scored give the uninterrupted rows."""
    rec = recipe(tmp_path / "r.yaml", {"pairs": {"rows": 6, "kind": "preference",
                                                 "preference": {"k": 3, "reward": {"model": str(tiny_rm)}}}})
    full, loaded, out = rows(pref_dir, "pairs"), load_recipe(rec), tmp_path / "out"
    ckpt = Checkpoint(out, "pairs")
    ckpt.write_fingerprint(loaded.fingerprint("pairs"), loaded.generation_settings("pairs"))
    writer = PieceWriter(ckpt, rank=0, world=1, backend="dummy")
    for i in range(3):
        writer.write(i, full[i]["uuid"], {**full[i], "reward_model": "marker"} if i == 0 else full[i])
    writer.close()
    pipeline.build(rec, out=out)
    got = rows(out, "pairs")
    assert got[0]["reward_model"] == "marker" and got[1:] == full[1:]
    assert {**got[0], "reward_model": full[0]["reward_model"]} == full[0]


def test_all_equal_scores_are_ties_regenerated_then_reported(tiny_llama3, tmp_path):
    flat = tiny_reward_model(tiny_llama3, tmp_path / "flat", 1)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(flat)
    torch.nn.init.zeros_(model.score.weight)   # every response scores 0: every attempt ties
    model.save_pretrained(flat)
    rec = recipe(tmp_path / "r.yaml", {"p": {"rows": 2, "kind": "preference",
                                             "preference": {"k": 2, "reward": {"model": str(flat)}}}},
                 max_attempts=2, max_replacements=0)
    with pytest.raises(MagpieError, match=r"tie"):
        pipeline.build(rec, out=tmp_path / "out")


def test_armorm_style_reward_model_with_score_output(tiny_armo, tmp_path):
    rec = recipe(tmp_path / "r.yaml", {"p": {"rows": 2, "kind": "preference", "preference": {
        "k": 2, "reward": {"model": str(tiny_armo), "trust_remote_code": True}}}})
    pipeline.build(rec, out=tmp_path / "out")
    got = rows(tmp_path / "out", "p")
    assert all(r["chosen_score"] > r["rejected_score"] for r in got)
    info = json.loads((tmp_path / "out" / MANIFEST).read_text())["configs"]["p"]["preference"]["reward_info"]
    assert info["output"] == "score"


def test_bad_preference_inputs_one_line_exit_2_nothing_written(tiny_llama3, tmp_path, capsys):
    multi = tiny_reward_model(tiny_llama3, tmp_path / "multi", 3)
    cases = {"k1": {"k": 1}, "labels": {"k": 2, "reward": {"model": str(multi)}}}
    for name, pref in cases.items():
        rec = recipe(tmp_path / f"{name}.yaml", {"p": {"rows": 2, "kind": "preference", "preference": pref}})
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli_main(["build", str(rec), "--out", str(tmp_path / name)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert exited.value.code == 2 and len(lines) == 1
        assert ("k must be >= 2" if name == "k1" else "3 labels and no score output") in lines[0]
        assert not (tmp_path / name).exists()


def test_trl_dpo_trainer_takes_a_built_preference_config(pref_dir, tiny_llama3, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = load_dataset("parquet", data_files=str(pref_dir / "pairs" / "*.parquet"), split="train")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3)
    tok = AutoTokenizer.from_pretrained(tiny_llama3)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", max_length=128)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    # chosen and rejected of each row, tokenized with the tiny model's chat template, side by side
    assert batch["input_ids"].shape[0] == 4 and bool((batch["completion_mask"].sum(-1) > 0).all())
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))


# --------------------------------------------------------------------------------------------- reasoning

def test_think_tags_from_templates_and_the_split():
    r1 = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}<think>\\n"
    assert think_tags(r1) == DEFAULT_TAGS
    assert think_tags("<thinking> {{ x }} </thinking>") == ThinkTags("<thinking>", "</thinking>")
    assert think_tags("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert split_reasoning("<think>\nplan\n</think>\n\nAnswer.", DEFAULT_TAGS) == ("plan", "Answer.")
    assert split_reasoning("plan</think>Answer.", DEFAULT_TAGS) == ("plan", "Answer.")   # prompt opened it
    assert split_reasoning("No block.", DEFAULT_TAGS) == (None, "No block.")
    assert split_reasoning("<think>cut at max tokens", DEFAULT_TAGS) == ("cut at max tokens", "")


def test_card_licence_is_the_more_restrictive_of_both_models():
    from magpie_hub.card.licenses import APACHE, GEMMA, LLAMA3, MIT, combine_licenses, license_for_model

    assert combine_licenses([APACHE, LLAMA3]) == LLAMA3 == combine_licenses([LLAMA3, MIT, LLAMA3])
    assert combine_licenses([MIT, APACHE]) == APACHE
    both = combine_licenses([license_for_model("Qwen/Qwen2-72B-Instruct"),
                             license_for_model("meta-llama/Meta-Llama-3-70B-Instruct"), GEMMA])
    assert both.id == "other" and both.license_name.startswith("source-model-license-and-llama3-and-gemma")


@pytest.mark.parametrize("inline", [False, True])
def test_reasoning_response_model_splits_into_reasoning_and_answer(tmp_path, tiny_qwen, inline):
    answers, asks = tmp_path / "answers.jsonl", tmp_path / "asks.jsonl"
    answers.write_text(json.dumps({"text": "<think>First add 2 and 2.</think>The answer is 4."}) + "\n")
    # the instruction model: a follow-up prompt that still held the reasoning would be answered "LEAKED"
    asks.write_text(json.dumps({"match": "First add", "text": "LEAKED"}) + "\n"
                    + json.dumps({"text": "What is 2+2?"}) + "\n")
    rec = recipe(tmp_path / "r.yaml", {"sft": {"rows": 3, "turns": 2}},
                 backend="scripted", backend_options={"answers": str(asks)},
                 response_model={"model": str(tiny_qwen), "backend": "scripted",
                                 "backend_options": {"answers": str(answers)}},
                 reasoning={"open": "<think>", "close": "</think>", "keep_inline": inline})
    pipeline.build(rec, out=tmp_path / "out")
    for r in rows(tmp_path / "out", "sft"):
        assert r["reasoning"] == "First add 2 and 2."
        assert [m["content"] for m in r["messages"] if m["role"] == "user"] == ["What is 2+2?"] * 2
        replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        if inline:
            assert r["response"].startswith("<think>") and all("<think>" in x for x in replies)
        else:
            assert r["response"] == "The answer is 4." and replies == ["The answer is 4."] * 2
            assert [c["value"] for c in r["conversations"] if c["from"] == "gpt"] == replies
        assert r["model"] == "tiny:llama3"
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    entry = manifest["configs"]["sft"]
    assert entry["response_model"]["id"] == str(tiny_qwen) and entry["reasoning"]["open"] == "<think>"
    assert {r["gen_response_configs"]["model"] for r in rows(tmp_path / "out", "sft")} == {str(tiny_qwen)}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| sft | " in card and "its chat template |" in card and "`reasoning` column" in card


# --------------------------------------------------------------------------------------------- sources

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    pipeline.build(recipe(root / "r.yaml", {"single": {"rows": 4}}), out=root / "out")
    return root / "out"


def test_source_dir_answer_and_base_modes(sft_dir, tiny_qwen, tmp_path):
    source = rows(sft_dir, "single")
    rec = recipe(tmp_path / "r.yaml", {
        "answer": {"rows": 3, "source": {"path": str(sft_dir)}, "response_model": {"model": str(tiny_qwen),
                                                                                   "backend": "dummy"}},
        "base": {"rows": 3, "source": {"path": str(sft_dir), "mode": "base"},
                 "response_model": {"model": "tiny:llama3", "backend": "dummy"}}})
    pipeline.build(rec, out=tmp_path / "out")
    answered, based = rows(tmp_path / "out", "answer"), rows(tmp_path / "out", "base")
    assert [r["uuid"] for r in answered] == [r["uuid"] for r in source[:3]] == [r["uuid"] for r in based]
    assert [r["instruction"] for r in answered] == [r["instruction"] for r in source[:3]]
    assert [r["gen_input_configs"] for r in answered] == [r["gen_input_configs"] for r in source[:3]]
    assert {r["gen_response_configs"]["model"] for r in answered} == {str(tiny_qwen)}
    assert [r["response"] for r in based] == [r["response"] for r in source[:3]]
    assert all(r["base_output"] and r["base_output"] != r["response"] for r in based)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["configs"]["base"]["response_model"]["template"] == "urial"
    assert manifest["configs"]["answer"]["source"]["path"] == str(sft_dir)


def test_source_without_needed_columns_is_refused(tmp_path):
    from datasets import Dataset

    (tmp_path / "src" / "default").mkdir(parents=True)
    Dataset.from_dict({"uuid": ["a"], "text": ["x"]}).to_parquet(tmp_path / "src" / "default" / "train-00000-of-00001.parquet")
    rec = recipe(tmp_path / "r.yaml", {"x": {"rows": 1, "source": {"path": str(tmp_path / "src")}}})
    with pytest.raises(RecipeError, match="no instruction, messages or conversations column"):
        pipeline.build(rec, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_response_model_without_a_chat_template_is_refused(tiny_llama3, tmp_path):
    base = tmp_path / "base-model"
    shutil.copytree(tiny_llama3, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (base / extra).unlink(missing_ok=True)
    rec = recipe(tmp_path / "r.yaml", {"x": {"rows": 1}}, response_model={"model": str(base), "backend": "dummy"})
    with pytest.raises(RecipeError, match="chat template of response_model .* cannot be derived"):
        pipeline.build(rec, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extend_a_published_v1_dataset_to_two_turns(sft_dir, tmp_path):
    from hub_server import LocalHub
    from test_publish import hub_env

    hub = LocalHub(tmp_path / "hub", token="hf_familytesttoken0123456789").start()
    rec = recipe(tmp_path / "r.yaml", {"mt": {"rows": 4, "turns": 2, "source": {
        "repo": "tester/single", "revision": "v1.0.0", "config": "single", "mode": "extend"}}})
    # one client process (HF_ENDPOINT is read at import; the test process is offline): publish, then build
    code = ("import sys; from magpie_hub.cli import main\n"
            "try:\n    main(sys.argv[1:5])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "main(sys.argv[5:])")
    try:
        proc = subprocess.run([sys.executable, "-c", code, "publish", str(sft_dir), "--repo=tester/single",
                               "--version=v1.0.0", "build", str(rec), "--out", str(tmp_path / "out")],
                              env=hub_env(hub), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        hub.stop()
    source, got = rows(sft_dir, "single"), rows(tmp_path / "out", "mt")
    assert [r["uuid"] for r in got] == [r["uuid"] for r in source]
    for old, new in zip(source, got, strict=True):
        assert new["turns"] == 2 and new["messages"][:2] == old["messages"] and len(new["messages"]) == 4
    entry = json.loads((tmp_path / "out" / MANIFEST).read_text())["configs"]["mt"]["source"]
    assert entry["repo"] == "tester/single" and entry["revision"] == "v1.0.0" and len(entry["sha"]) == 40
    shutil.rmtree(tmp_path / "hub", ignore_errors=True)
