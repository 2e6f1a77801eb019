"""The diversity and duplicate figures shared by the card and scripts/bench_quality.py."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import make_dataset

from magpie_hub.card.diversity import (
    DistinctN,
    PairwiseMean,
    dataset_diversity,
    distinct_n,
    mean_pairwise_distance,
    near_duplicate_rate,
    nearest_sq_l2,
    words,
)
from magpie_hub.card.stats import config_shards
from magpie_hub.tags.base import work_dir
from magpie_hub.tags.dedup import EMBEDDINGS, text_key

ROOT = Path(__file__).resolve().parents[1]


def unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_pairwise(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float(np.mean([1.0 - x[i] @ x[j] for i, j in itertools.combinations(range(len(x)), 2)]))


def test_distinct_n_on_words():
    assert words("Hello, hello WORLD! Ça va? x_1") == ["hello", "hello", "world", "ça", "va", "x_1"]
    # unigrams a b a a b: 2 distinct of 5; bigrams (a b) (b a) (a b): 2 distinct of 3
    assert distinct_n(["A b, a.", "a B"]) == {"distinct_1": 0.4, "distinct_2": 0.6667}
    streamed = DistinctN()
    streamed.add(["A b, a."])
    streamed.add(["a B", None, ""])
    assert streamed.result() == {"distinct_1": 0.4, "distinct_2": 0.6667} and streamed.rows == 4
    assert distinct_n(["one", ""]) == {"distinct_1": 1.0, "distinct_2": None}   # no bigram at all
    assert distinct_n([]) == {"distinct_1": None, "distinct_2": None}


def test_near_duplicates_and_nearest_distance():
    assert near_duplicate_rate([0.0, 0.049, 0.05, None, float("nan"), 1.2]) == pytest.approx(2 / 6)
    assert near_duplicate_rate([0.01], rows=4) == 0.25 and near_duplicate_rate([]) is None
    x = unit(np.random.default_rng(0), 40)
    x[7] = x[3]                                                      # an identical text: distance 0
    got = nearest_sq_l2(x, block=16)                                 # several blocks
    full = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(got, full.min(axis=1), atol=1e-5)
    assert got[3] == pytest.approx(0.0, abs=1e-6) and got[7] == pytest.approx(0.0, abs=1e-6)
    assert near_duplicate_rate(got) == pytest.approx(2 / 40)
    assert np.isinf(nearest_sq_l2(x[:1])).all()


def test_mean_pairwise_distance_is_exact_and_streams():
    rng = np.random.default_rng(1)
    x = unit(rng, 30) * rng.uniform(0.5, 2.0, size=(30, 1))        # any length: normalised first
    assert mean_pairwise_distance(x) == pytest.approx(brute_pairwise(x), abs=1e-4)
    acc = PairwiseMean()
    for part in (x[:7], x[7:8], x[8:0], x[8:]):
        acc.add(part)
    assert acc.result() == mean_pairwise_distance(x) and acc.rows == 30
    same = np.repeat(x[:1], 5, axis=0)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_distance(np.stack([x[0], -x[0]])) == pytest.approx(2.0)
    assert mean_pairwise_distance(x[:1]) is None


def _add_distances(directory: Path, distances: dict[str, list[float | None]]) -> None:
    for config, values in distances.items():
        start = 0
        for path in config_shards(directory)[config]:
            table = pq.read_table(path)
            part = values[start:start + table.num_rows]
            start += table.num_rows
            pq.write_table(table.append_column("min_neighbor_distance", pa.array(part, pa.float64())), path)


def _save_embeddings(directory: Path, rows: list[tuple[str, str, np.ndarray]], model: str = "some/embedder"):
    vecs = np.stack([v for _, _, v in rows]).astype(np.float16)
    table = pa.table({"uuid": [u for u, _, _ in rows], "text_key": [text_key(t) for _, t, _ in rows],
                      "embedding": pa.FixedSizeListArray.from_arrays(vecs.reshape(-1), vecs.shape[1])})
    path = work_dir(directory, "dedup") / EMBEDDINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({"model": model}), path)


def test_dataset_diversity_reads_dedup_columns_and_embeddings(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 24, "code": 10})
    shards = config_shards(d)
    plain = dataset_diversity(d, shards)
    rows = {c: [r for p in paths for r in pq.read_table(p, columns=["uuid", "instruction"]).to_pylist()]
            for c, paths in shards.items()}
    assert plain["code"] == {"rows": 10, "sampled": False, "tokens": "lower-cased words",
                             **distinct_n(r["instruction"] for r in rows["code"])}   # no dedup: no more keys
    # dedup columns: near duplicates counted over all rows (null = no neighbour)
    dist = {"single_turn": [0.01, None] + [0.5] * 21 + [0.049], "code": [0.2] * 9 + [0.0]}
    _add_distances(d, dist)
    rng = np.random.default_rng(2)
    vectors = {c: unit(rng, len(r)) for c, r in rows.items()}
    saved = [(r["uuid"], r["instruction"], v) for c in rows for r, v in zip(rows[c], vectors[c], strict=True)]
    edited = next(i for i, s in enumerate(saved) if s[0] == rows["single_turn"][0]["uuid"])
    saved[edited] = (saved[edited][0], "an instruction edited since the dedup run", saved[edited][2])  # skipped
    _save_embeddings(d, saved)
    figures = dataset_diversity(d, shards)
    assert figures["single_turn"]["near_duplicates"] == {"rows": 2, "rate": round(2 / 24, 4), "threshold": 0.05}
    assert figures["code"]["near_duplicates"]["rows"] == 1
    assert figures["single_turn"]["pairwise"]["rows"] == 23
    assert figures["single_turn"]["pairwise"]["mean"] == pytest.approx(brute_pairwise(vectors["single_turn"][1:]),
                                                                       abs=1e-3)
    assert figures["code"]["pairwise"] == {"mean": pytest.approx(brute_pairwise(vectors["code"]), abs=1e-3),
                                           "metric": "cosine distance", "rows": 10, "model": "some/embedder"}
    # a sample bounds the cost: seeded, so the same directory gives the same figures
    small = dataset_diversity(d, shards, max_rows=8, seed=5)
    assert small == dataset_diversity(d, shards, max_rows=8, seed=5)
    assert small["single_turn"]["rows"] == 8 and small["single_turn"]["sampled"] is True
    assert small["single_turn"]["pairwise"]["rows"] <= 8 and small["code"]["pairwise"]["rows"] == 8
    assert small["single_turn"]["near_duplicates"]["rows"] == 2           # still over all rows


def test_empty_config(tmp_path):
    d = make_dataset(tmp_path / "ds", sizes={"single_turn": 3})
    for path in config_shards(d)["single_turn"]:
        pq.write_table(pq.read_table(path).slice(0, 0), path)
    _add_distances(d, {"single_turn": []})
    got = dataset_diversity(d, config_shards(d))["single_turn"]
    assert got == {"rows": 0, "sampled": False, "tokens": "lower-cased words", "distinct_1": None,
                   "distinct_2": None, "near_duplicates": {"rows": 0, "rate": None, "threshold": 0.05}}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_request_heuristic():
    bench = _bench()
    for text in ("Can you help me plan a trip?", "How do I sort a list in Python", "Write a poem about rain.",
                 "I'm planning a party. Can you help", "\"Explain recursion.\"", "I need a name for my cat.",
                 "My essay is below. Please proofread it.", "1. List three prime numbers"):
        assert bench.is_request(text), text
    for text in ("The weather was nice today.", "Thanks for this!", "I'm ready to assist you.",
                 "Writers often struggle."):
        assert not bench.is_request(text), text
    assert bench.unquote(' "What is 2+2?" ') == "What is 2+2?" and bench.unquote("'x") == "'x"
