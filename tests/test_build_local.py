"""The build on the real local transformers backend (tiny random-weight models), and the tag hook."""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import yaml
from conftest import ROOT

from magpie_hub import pipeline
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import load_recipe


def test_demo_recipe_subset_on_tiny_llama3(tmp_path):
    """The README's demo recipe (its generation part: the real model, its judges and filter are covered by
    test_real_model.py) on the tiny model: 3 rows of single_turn and multi_turn, real batched backend."""
    spec = yaml.safe_load((ROOT / "builders" / "demo.yaml").read_text())
    spec = {k: v for k, v in spec.items() if k not in ("tags", "filters")}
    spec["response_sampling"] = {"temperature": 1.0, "top_p": 1.0}  # random weights: greedy ends a reply at once
    demo = tmp_path / "demo.yaml"
    demo.write_text(yaml.safe_dump(spec))
    out = tmp_path / "demo"
    manifest = pipeline.build(demo, out=out, configs=["single_turn", "multi_turn"], rows=3, model="tiny:llama3")
    recipe = load_recipe(demo, {"rows": 3, "model": "tiny:llama3"})
    turns_mt = spec["configs"]["multi_turn"]["turns"]
    for name, turns in (("single_turn", 1), ("multi_turn", turns_mt)):
        ds = datasets.load_dataset(str(out), name, split="train")
        assert ds["uuid"] == [recipe.plan(name).uuid(i) for i in range(3)]
        assert all(r["turns"] == turns and len(r["conversations"]) == 2 * turns for r in ds)
        for row in ds:
            for msg in row["messages"]:
                assert msg["content"] and msg["content"] == msg["content"].strip()
                assert "<|eot_id|>" not in msg["content"] and "<|start_header_id|>" not in msg["content"]
        pre = ds[0]["gen_input_configs"]["pre_query_template"]
        assert pre == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert manifest["model"]["id"] == "tiny:llama3" and manifest["backend"]["name"] == "transformers"
    assert manifest["configs"]["multi_turn"]["generated_tokens"] > 0


def test_qwen_format_category_and_default_configs(tmp_path, tiny_qwen):
    """Qwen2.5's template (default system prompt injected): category pre-query replaces it, the plain
    config keeps it. Dummy backend: this checks the build's wiring, not the tiny model's text."""
    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_qwen), "backend": "dummy", "seed": 1,
        "configs": {"code": {"rows": 2, "category": "code"}, "single_turn": {"rows": 2}},
    }))
    out = tmp_path / "q"
    pipeline.build(recipe, out=out)
    rows = pq.read_table(out / "code").to_pylist()
    assert len(rows) == 2 and all(r["category"] == "code" for r in rows)
    pre = rows[0]["gen_input_configs"]["pre_query_template"]
    assert pre.startswith("<|im_start|>system\nYou are an AI assistant designed to provide helpful, step-by-step "
                          "guidance on coding problems.") and pre.endswith("<|im_end|>\n<|im_start|>user\n")
    plain = pq.read_table(out / "single_turn").to_pylist()[0]["gen_input_configs"]["pre_query_template"]
    assert plain == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                     "<|im_end|>\n<|im_start|>user\n")


def test_recipe_tags_run_after_generation(tmp_path, monkeypatch):
    calls = []

    def fake_tag(directory, steps=None, **kw):
        calls.append((directory, steps))
        return {"ran": [], "skipped": list(steps or []), "rows": {}}

    monkeypatch.setattr(pipeline, "tag_dataset", fake_tag)
    recipe = tmp_path / "t.yaml"
    secret = "hf_" + "Zq7" * 8
    recipe.write_text(yaml.safe_dump({"model": "tiny:llama3", "backend": "dummy", "tags": ["lengths"],
                                      "card": {"pretty_name": "t", "hf_token": secret, "api_key": "k-123456"},
                                      "configs": {"single_turn": {"rows": 2}}}))
    out = tmp_path / "t"
    pipeline.build(recipe, out=out)
    assert calls == [(out, ["lengths"])]                             # the recipe's tags, handed over in memory
    text = (out / MANIFEST).read_text()
    assert secret not in text and "k-123456" not in text           # secrets never reach the manifest
    assert json.loads((out / MANIFEST).read_text())["recipe"]["tags"] == ["lengths"]   # recorded
    calls.clear()
    recipe.write_text(yaml.safe_dump({"model": "tiny:llama3", "backend": "dummy",
                                      "configs": {"single_turn": {"rows": 2}}}))
    pipeline.build(recipe, out=tmp_path / "t2")
    assert calls == []
