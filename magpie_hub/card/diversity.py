"""Diversity and duplicate figures of a set of instructions, shared by the dataset card and
``scripts/bench_quality.py`` (one definition of each number).

* **distinct-n** (Li et al., 2016): distinct n-grams / all n-grams over the whole set, on lower-cased word
  tokens (:func:`words`: Unicode ``\\w+`` runs, punctuation dropped). :class:`DistinctN` streams.
* **near-duplicate rate**: the share of rows whose nearest OTHER row lies at squared L2 distance
  < 0.05 between normalised embeddings, the dedup tag's definition (its ``min_neighbor_distance``
  column; a null there = no other row = not a duplicate). :func:`nearest_sq_l2` computes that distance
  for a set of embeddings without the tag (exact, blockwise).
* **mean pairwise embedding distance**: the mean COSINE distance ``1 - cos`` over all pairs of distinct
  rows (for unit vectors squared L2 = 2 x cosine distance). :class:`PairwiseMean` streams it exactly in
  O(rows x dim) with no pair matrix: for unit vectors ``sum_{i != j} x_i . x_j = |sum x|^2 - rows``.

:func:`dataset_diversity` gives the card these figures per config of a dataset directory: distinct-n over
the instructions (all of them, or a seeded sample of ``max_rows``), the near-duplicate rate from the dedup
columns (all rows; omitted without them) and the mean pairwise distance of the same rows from the dedup
step's saved embeddings (omitted without them; a row whose text changed since is skipped). Cost: one
read of the instruction column and one of the embeddings file; memory bounded by ``max_rows``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from magpie_hub.tags.base import work_dir
from magpie_hub.tags.dedup import EMBEDDINGS, DedupStep, text_key

DEFAULT_MAX_ROWS = 50_000      # rows per config the card's distinct-n and pairwise distance read at most
NEAR_DUP_THRESHOLD = 0.05        # squared L2 of normalised embeddings (the dedup tag's threshold)
TOKENS = "lower-cased words"     # what distinct-n counts (said in the card and the benchmark)
METRIC = "cosine distance"       # what the mean pairwise distance measures
_WORD_RE = re.compile(r"\w+")


def words(text: str | None) -> list[str]:
    """Lower-cased word tokens of ``text`` (Unicode letters, digits and ``_``; punctuation dropped)."""
    return _WORD_RE.findall((text or "").lower())


class DistinctN:
    """distinct-n for several n over a stream of texts: ``add`` batches, then ``result()``."""

    def __init__(self, orders: Iterable[int] = (1, 2)):
        self.orders = tuple(orders)
        self.vocab: dict[str, int] = {}
        self.seen: dict[int, set] = {n: set() for n in self.orders}
        self.total: dict[int, int] = dict.fromkeys(self.orders, 0)
        self.rows = 0

    def add(self, texts: Iterable[str | None]) -> None:
        vocab = self.vocab
        for text in texts:
            self.rows += 1
            ids = [vocab.setdefault(w, len(vocab)) for w in words(text)]   # ints: far smaller sets than str
            for n in self.orders:
                grams = len(ids) - n + 1
                if grams <= 0:
                    continue
                self.total[n] += grams
                self.seen[n].update(zip(*(ids[k:] for k in range(n)), strict=False) if n > 1 else ids)

    def result(self, digits: int = 4) -> dict[str, float | None]:
        """``{"distinct_1": ..., "distinct_2": ...}``; None for an order with no n-gram at all."""
        return {f"distinct_{n}": (round(len(self.seen[n]) / self.total[n], digits) if self.total[n] else None)
                for n in self.orders}


def distinct_n(texts: Iterable[str | None], orders: Iterable[int] = (1, 2), digits: int = 4) -> dict:
    """distinct-n of a set of texts (see :class:`DistinctN`)."""
    counter = DistinctN(orders)
    counter.add(texts)
    return counter.result(digits)


def near_duplicate_rate(distances: Iterable[float | None], rows: int | None = None,
                        threshold: float = NEAR_DUP_THRESHOLD) -> float | None:
    """Share of rows whose nearest-neighbour squared L2 is below ``threshold`` (None/NaN: no neighbour).
    ``rows``: the denominator when ``distances`` holds only some of the rows' values."""
    values = np.asarray([np.nan if d is None else d for d in distances], dtype=np.float64)
    total = values.size if rows is None else rows
    if not total:
        return None
    return float(np.count_nonzero(values < threshold)) / total   # NaN < t is False


def nearest_sq_l2(vectors: np.ndarray, block: int = 1024) -> np.ndarray:
    """Squared L2 distance from each row to its nearest OTHER row (inf when there is none), exact."""
    x = np.asarray(vectors, dtype=np.float32)
    n = x.shape[0]
    out = np.full(n, np.inf)
    if n < 2:
        return out
    sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T).astype(np.float64)
        d[np.arange(stop - start), np.arange(start, stop)] = np.inf      # not the row itself
        out[start:stop] = np.maximum(d.min(axis=1), 0.0)
    return out


class PairwiseMean:
    """Mean cosine distance over all pairs of distinct rows, streamed: ``add`` blocks, then ``result()``.
    Rows are normalised here (a stored float16 vector is only nearly unit length); zero rows are skipped."""

    def __init__(self):
        self.sum: np.ndarray | None = None
        self.rows = 0

    def add(self, vectors: np.ndarray) -> None:
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or not x.shape[0]:
            return
        norms = np.linalg.norm(x, axis=1)
        x = x[norms > 0] / norms[norms > 0, None]
        self.sum = x.sum(axis=0) if self.sum is None else self.sum + x.sum(axis=0)
        self.rows += x.shape[0]

    def result(self, digits: int = 4) -> float | None:
        m = self.rows
        if m < 2 or self.sum is None:
            return None
        mean_cos = (float(self.sum @ self.sum) - m) / (m * (m - 1))
        return round(1.0 - mean_cos, digits)


def mean_pairwise_distance(vectors: np.ndarray, digits: int = 4) -> float | None:
    """Mean cosine distance over all pairs of distinct rows of ``vectors`` (see :class:`PairwiseMean`)."""
    acc = PairwiseMean()
    acc.add(vectors)
    return acc.result(digits)


# ------------------------------------------------------------------------------------ dataset directories


def _rows(paths: list[Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _config_pass(paths: list[Path], take: np.ndarray | None, want_keys: bool) -> tuple[dict, list[str]]:
    """One read of a config: distinct-n of the chosen rows, near-duplicate count of all rows, row keys
    (uuid + text digest) of the chosen rows for the embedding lookup."""
    present = set(pq.read_schema(paths[0]).names)
    dist_col = "min_neighbor_distance" if "min_neighbor_distance" in present else None
    want_keys = want_keys and "uuid" in present
    cols = ["instruction", *(["uuid"] if want_keys else []), *([dist_col] if dist_col else [])]
    counter, keys, near, pos = DistinctN(), [], 0, 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=cols):
            if dist_col:
                near += int(pc.sum(pc.less(batch.column(dist_col), NEAR_DUP_THRESHOLD)).as_py() or 0)
            part = batch
            if take is not None:
                idx = take[(take >= pos) & (take < pos + batch.num_rows)] - pos
                part = batch.take(pa.array(idx))
            pos += batch.num_rows
            texts = part.column("instruction").to_pylist()
            counter.add(texts)
            if want_keys:
                keys += [f"{u}\0{text_key(t or '')}" for u, t in zip(part.column("uuid").to_pylist(), texts,
                                                                      strict=True)]
    figures: dict = {"rows": counter.rows, "sampled": take is not None, "tokens": TOKENS, **counter.result()}
    if dist_col:
        figures["near_duplicates"] = {"rows": near, "rate": round(near / pos, 4) if pos else None,
                                      "threshold": NEAR_DUP_THRESHOLD}
    return figures, keys


def _pairwise(path: Path, keys: dict[str, list[str]]) -> tuple[str, dict[str, PairwiseMean]]:
    """The saved embeddings' model and, per config, the mean of the rows whose keys are given."""
    shard = pq.ParquetFile(path)
    model = (shard.schema_arrow.metadata or {}).get(b"model", b"").decode()
    sums = {name: PairwiseMean() for name in keys}
    wanted = {name: pa.array(k, pa.string()) for name, k in keys.items() if k}
    for batch in shard.iter_batches(batch_size=65_536, columns=["uuid", "text_key", "embedding"]):
        joined = pc.binary_join_element_wise(batch.column("uuid"), batch.column("text_key"), "\0")
        emb = batch.column("embedding")
        for name, values in wanted.items():
            hits = emb.filter(pc.is_in(joined, value_set=values))
            if len(hits):
                flat = pc.list_flatten(hits).to_numpy(zero_copy_only=False)
                sums[name].add(flat.reshape(len(hits), -1))
    return model, sums


def dataset_diversity(directory: Path, shards: dict[str, list[Path]], *, max_rows: int = DEFAULT_MAX_ROWS,
                      seed: int = 0) -> dict[str, dict]:
    """Per config: ``{rows, sampled, tokens, distinct_1, distinct_2}``, plus ``near_duplicates`` {rows,
    rate, threshold} when the dedup columns exist and ``pairwise`` {mean, metric, rows, model} when the
    dedup step's embeddings cover at least two of the chosen rows. Deterministic for a given directory."""
    embeddings = work_dir(directory, DedupStep.name) / EMBEDDINGS
    out, keys = {}, {}
    for name, paths in shards.items():
        rows = _rows(paths)
        take = (np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
                if rows > max_rows else None)
        out[name], keys[name] = _config_pass(paths, take, embeddings.is_file())
    if embeddings.is_file() and any(keys.values()):
        model, sums = _pairwise(embeddings, keys)
        for name, acc in sums.items():
            mean = acc.result()
            if mean is not None:
                out[name]["pairwise"] = {"mean": mean, "metric": METRIC, "rows": acc.rows, "model": model}
    return out
