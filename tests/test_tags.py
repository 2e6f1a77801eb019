"""Tag runner + lengths/language steps on small dataset dirs built here (docs/architecture.md layout)."""

from __future__ import annotations

import hashlib
import json
import uuid as uuidlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_dataset

from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.errors import DatasetDirError, MagpieError, ModelError, RecipeError

ENGLISH = ["Explain how photosynthesis works in simple terms.",
           "Write a short poem about the sea at night.",
           "What is the difference between a list and a tuple in Python?"]
OTHER = {"FR": "Pouvez-vous m'expliquer comment fonctionne la photosynthèse des plantes vertes ?",
         "DE": "Kannst du mir bitte erklären, wie die Photosynthese bei grünen Pflanzen funktioniert?",
         "ZH": "请用简单的语言解释一下光合作用是如何进行的。",
         "ES": "¿Puedes explicarme cómo funciona la fotosíntesis en las plantas verdes?"}


def make_row(instruction: str | None, response: str | None = "Sure, here is an answer.", *,
             turns: int = 1, uid: str | None = None, config: str = "single") -> dict:
    conv = [{"from": "human", "value": instruction or ""}, {"from": "gpt", "value": response or ""}]
    if turns == 2:
        conv += [{"from": "human", "value": "And a follow-up question?"},
                 {"from": "gpt", "value": "A much longer follow-up answer " * 5}]
    return {
        "uuid": uid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"{config}/{instruction}/{response}")),
        "model": "tiny", "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "seed": 0,
                                               "pre_query_template": "<|im_start|>user\n",
                                               "input_generator": "tiny"},
        "instruction": instruction, "response": response, "conversations": conv,
        "messages": [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
                     for c in conv],
        "turns": turns, "category": None,
    }


def make_dir(root: Path, configs: dict[str, list[dict]], *, model: str | None = None, shards: int = 2,
             tags: list | None = None) -> Path:
    """A built-dataset-shaped dir: shards via datasets, a manifest naming the generating model."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in configs.items():
        folder = root / name
        folder.mkdir()
        n = max(1, min(shards, len(rows))) if rows else 1
        bounds = [len(rows) * i // n for i in range(n + 1)]
        if not rows:
            pq.write_table(GENERATION_FEATURES.arrow_schema.empty_table(), folder / "train-00000-of-00001.parquet")
        for i in range(n if rows else 0):
            ds = Dataset.from_list(rows[bounds[i]:bounds[i + 1]], features=GENERATION_FEATURES)
            ds.to_parquet(str(folder / f"train-{i:05d}-of-{n:05d}.parquet"))
    manifest: dict = {"model": {"id": model, "revision": None}} if model else {}
    if tags is not None:
        manifest["recipe"] = {"tags": tags}
    (root / "magpie_manifest.json").write_text(json.dumps(manifest))
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_rows(root: Path, config: str) -> list[dict]:
    return load_dataset("parquet", data_files=str(root / config / "train-*.parquet"), split="train").to_list()


@pytest.fixture
def qwen_tok(fixtures_dir) -> str:
    return str(fixtures_dir / "qwen2.5-instruct")


@pytest.fixture
def tagged_dir(tmp_path, qwen_tok) -> Path:
    rows = [make_row(t) for t in ENGLISH] + [make_row(t) for t in OTHER.values()]
    rows.append(make_row("Tell me about two turns please.", "First answer.", turns=2))
    rows.append(make_row("What does an empty response measure?", None))
    return make_dir(tmp_path / "ds", {"single": rows, "multi": [make_row("Plan a trip to Rome.", turns=2,
                                                                          config="multi")]}, model=qwen_tok)


def test_lengths_and_language(tagged_dir, qwen_tok):
    from transformers import AutoTokenizer

    from magpie_hub.tags.runner import tag_dataset

    shard_names = sorted(p.name for p in (tagged_dir / "single").iterdir())
    before = pq.read_table(tagged_dir / "single").column("uuid").to_pylist()
    result = tag_dataset(tagged_dir, ["lengths", "language"])
    assert result["ran"] == ["lengths", "language"] and result["rows"] == {"multi": 1, "single": 9}

    tok = AutoTokenizer.from_pretrained(qwen_tok)
    rows = read_rows(tagged_dir, "single")
    assert [r["uuid"] for r in rows] == before                          # same rows, same order
    assert sorted(p.name for p in (tagged_dir / "single").iterdir()) == shard_names  # same shards
    for r in rows:
        assert r["instruction_length"] == len(tok(r["instruction"], add_special_tokens=False)["input_ids"])
        assert r["instruction_chars"] == len(r["instruction"])
        if r["response"] is None:
            assert r["response_length"] is None and r["response_chars"] is None
        else:  # multi-turn rows: first turn only (the response column)
            assert r["response_length"] == len(tok(r["response"], add_special_tokens=False)["input_ids"])
            assert r["response_chars"] == len(r["response"])
    langs = {r["instruction"]: r["language"] for r in rows}
    assert all(langs[t] == "EN" for t in ENGLISH)
    assert {code: langs[text] for code, text in OTHER.items()} == {c: c for c in OTHER}
    features = load_dataset("parquet", data_files=str(tagged_dir / "single" / "*.parquet"), split="train").features
    assert features["instruction_length"].dtype == "int64" and features["language"].dtype == "string"
    manifest = json.loads((tagged_dir / "magpie_manifest.json").read_text())
    steps = manifest["tags"]["steps"]
    assert steps["lengths"]["model"] == qwen_tok and steps["lengths"]["turns"] == "first"
    assert steps["language"]["columns"] == ["language"] and "lingua" in steps["language"]["model"]
    assert "datasets" in manifest["tags"]["versions"]
    assert not (tagged_dir / ".magpie" / "tags" / "lengths" / "ckpt").exists()   # checkpoints cleaned


def test_language_unknown_is_null_and_options(tmp_path, qwen_tok):
    from magpie_hub.tags.runner import tag_dataset

    rows = [make_row("12345 67890"), make_row("!!!"), make_row(OTHER["FR"]), make_row(ENGLISH[0])]
    d = make_dir(tmp_path / "ds", {"c": rows}, model=qwen_tok,
                 tags=[{"language": {"low_accuracy": True, "languages": ["en", "fr"]}}])
    tag_dataset(d)   # steps from the recipe recorded in the manifest, with options
    got = [r["language"] for r in read_rows(d, "c")]
    assert got == [None, None, "FR", "EN"]
    manifest = json.loads((d / "magpie_manifest.json").read_text())
    assert manifest["tags"]["steps"]["language"]["accuracy"] == "low"
    assert "instruction_length" not in read_rows(d, "c")[0]   # only the recipe's steps ran


def test_rerun_is_idempotent(tagged_dir):
    from magpie_hub.tags.runner import tag_dataset

    tag_dataset(tagged_dir, ["lengths", "language"])
    first = snapshot(tagged_dir)
    rows1 = read_rows(tagged_dir, "single")
    again = tag_dataset(tagged_dir, ["lengths", "language"])
    assert again["ran"] == [] and again["skipped"] == ["lengths", "language"]
    assert snapshot(tagged_dir) == first                  # nothing rewritten
    rows2 = read_rows(tagged_dir, "single")
    assert rows1 == rows2 and len(rows2) == 9
    cols = pq.read_schema(next((tagged_dir / "single").glob("*.parquet"))).names
    assert len(cols) == len(set(cols))
    # force recomputes in place: same rows, same columns, no duplicates
    tag_dataset(tagged_dir, ["language"], force=True)
    rows3 = read_rows(tagged_dir, "single")
    assert rows3 == rows1
    assert pq.read_schema(next((tagged_dir / "single").glob("*.parquet"))).names == cols


def test_new_config_only_tags_what_lacks(tagged_dir, qwen_tok):
    from magpie_hub.tags.runner import tag_dataset

    tag_dataset(tagged_dir, ["lengths"])
    single = snapshot(tagged_dir / "single")
    make_dir(tagged_dir / "_tmp", {"extra": [make_row("Another one.", config="extra")]}, model=qwen_tok)
    (tagged_dir / "_tmp" / "extra").rename(tagged_dir / "extra")
    for p in (tagged_dir / "_tmp").iterdir():
        p.unlink()
    (tagged_dir / "_tmp").rmdir()
    out = tag_dataset(tagged_dir, ["lengths"])
    assert out["ran"] == ["lengths"]
    assert snapshot(tagged_dir / "single") == single     # complete configs are not rewritten
    assert read_rows(tagged_dir, "extra")[0]["instruction_chars"] == len("Another one.")


def test_resume_uses_checkpointed_chunks(tagged_dir, monkeypatch):
    """A run killed after some chunks resumes from them: the finished chunks are not recomputed."""
    from magpie_hub.tags import language as language_mod
    from magpie_hub.tags.runner import tag_dataset

    calls = {"n": 0}
    real_run = language_mod.LanguageStep.run

    def dying_run(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill in the middle of the third chunk
        return real_run(self, batch)

    monkeypatch.setattr(language_mod.LanguageStep, "run", dying_run)
    original = snapshot(tagged_dir)
    with pytest.raises(KeyboardInterrupt):
        tag_dataset(tagged_dir, [{"language": {"batch_size": 2}}])
    parts = sorted((tagged_dir / ".magpie" / "tags" / "language" / "ckpt" / "multi").glob("part-*.parquet"))
    parts += sorted((tagged_dir / ".magpie" / "tags" / "language" / "ckpt" / "single").glob("part-*.parquet"))
    assert len(parts) == 2                                           # multi: 1 chunk, single: 1 of 5
    assert {k: v for k, v in snapshot(tagged_dir).items() if not k.startswith(".magpie")} == original
    calls["n"] = -100
    tag_dataset(tagged_dir, [{"language": {"batch_size": 2}}])
    assert calls["n"] == -100 + 4                                    # only the 4 missing chunks ran
    assert [r["language"] for r in read_rows(tagged_dir, "single")][:3] == ["EN", "EN", "EN"]


def test_bad_input_leaves_dir_untouched(tmp_path, qwen_tok):
    from magpie_hub.tags.runner import tag_dataset

    with pytest.raises(DatasetDirError, match="does not exist"):
        tag_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetDirError, match="no config"):
        tag_dataset(tmp_path / "empty")

    bad = make_dir(tmp_path / "bad", {"c": [make_row("hello there")]}, model=qwen_tok)
    table = pq.read_table(bad / "c" / "train-00000-of-00001.parquet").drop_columns(["conversations"])
    pq.write_table(table, bad / "c" / "train-00000-of-00001.parquet")
    before = snapshot(bad)
    with pytest.raises(DatasetDirError, match="conversations"):
        tag_dataset(bad)
    assert snapshot(bad) == before

    empty = make_dir(tmp_path / "emptycfg", {"a": [make_row("hi")], "b": []}, model=qwen_tok)
    before = snapshot(empty)
    with pytest.raises(DatasetDirError, match="'b' .* no rows"):
        tag_dataset(empty)
    assert snapshot(empty) == before

    good = make_dir(tmp_path / "good", {"c": [make_row("hello there")]}, model=qwen_tok)
    before = snapshot(good)
    with pytest.raises(RecipeError, match="unknown tag step"):
        tag_dataset(good, ["lenghts"])
    with pytest.raises(ModelError, match="not available offline"):
        tag_dataset(good, ["lengths", {"dedup": {"model": "sentence-transformers/not-a-cached-model"}}])
    with pytest.raises(ModelError, match="tag step 'lengths', the tokenizer of .*does not exist"):
        tag_dataset(good, [{"lengths": {"model": str(tmp_path / "no-such-model")}}])
    with pytest.raises(RecipeError, match="at least two"):
        tag_dataset(good, [{"language": {"languages": ["en"]}}])
    assert snapshot(good) == before
    assert issubclass(DatasetDirError, MagpieError)


def test_no_model_recorded_falls_back_to_model_column(tmp_path, qwen_tok):
    from magpie_hub.tags.runner import tag_dataset

    row = make_row("How long is this?")
    row["model"] = qwen_tok
    d = make_dir(tmp_path / "ds", {"c": [row]})
    tag_dataset(d, ["lengths"])
    assert read_rows(d, "c")[0]["instruction_length"] > 0
    row["model"] = None
    d2 = make_dir(tmp_path / "ds2", {"c": [row]})
    with pytest.raises(DatasetDirError, match="no generating model"):
        tag_dataset(d2, ["lengths"])
