"""Analyses for the dataset card: statistics (``magpie_stats.json``) and plots (``assets/*.png``).

:func:`compute_stats` streams the shards of every config (only the columns it needs, batch by batch, so
memory stays flat in the number of text bytes) and returns per-config rows, length summaries (tokens when
the ``*_length`` tag columns exist, else characters), label distributions and number summaries of the
columns the registry (:mod:`magpie_hub.tags`) marks for the card, in its order, and the diversity and
duplicate figures of :mod:`magpie_hub.card.diversity` (``configs.NAME.diversity``).
:func:`analyze` adds the plots: length histograms, bar charts of the distributions and a seeded 2-D t-SNE
map of a sample of instruction embeddings (the dedup step's saved ones where it embedded those rows with
the same model), and writes everything atomically into the dataset directory.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from magpie_hub.card.diversity import dataset_diversity
from magpie_hub.card.mix_plot import plot_mix
from magpie_hub.dataset.directory import atomic_path, atomic_write_text, read_manifest
from magpie_hub.errors import DatasetDirError, ModelError
from magpie_hub.layout import ASSETS_DIR, SPLIT, STATS, config_names, shard_paths
from magpie_hub.tags import Column, registered, registered_columns
from magpie_hub.tags.dedup import DedupStep, saved_embeddings
from magpie_hub.tags.dedup import embedding_model as dedup_embedding_model

STATS_VERSION = 1
DEFAULT_MAX_POINTS = 2000
FIGSIZE, DPI = (9.0, 5.0), 100            # 900 x 500 px
MAP_FIGSIZE = (8.0, 8.0)                  # 800 x 800 px
BATCH = 65_536


def distributions() -> dict[str, tuple[str, ...] | None]:
    """Text columns the card summarises as label distributions, in card order, with the scale when ordinal."""
    return {c.name: (c.labels if c.ordinal else None) for c in _card_columns(numeric=False)}


def numbers() -> tuple[str, ...]:
    """Numeric columns the card summarises (mean, median, p90, min, max), in card order."""
    return tuple(c.name for c in _card_columns(numeric=True))


def _card_columns(*, numeric: bool) -> list[Column]:
    chosen = [c for c in registered_columns().values() if c.card is not None and c.numeric == numeric]
    return sorted(chosen, key=lambda c: c.card)


def config_shards(directory: Path) -> dict[str, list[Path]]:
    """``{config: [train-*.parquet, ...]}`` for every config directory that holds shards, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetDirError(f"{directory} is not a directory (give a dataset directory written by build)")
    return {name: shard_paths(directory, name) for name in config_names(directory)}


def _length_source(columns: set[str], which: str) -> tuple[str, str]:
    """(column, unit) to measure ``which`` (instruction / response) by."""
    if f"{which}_length" in columns:
        return f"{which}_length", "tokens"
    if f"{which}_chars" in columns:
        return f"{which}_chars", "characters"
    if which in columns:
        return which, "characters"
    return "", ""


def _summary(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    return {"mean": round(float(values.mean()), 2), "median": round(float(np.median(values)), 2),
            "p90": round(float(np.percentile(values, 90)), 2), "min": float(values.min()), "max": float(values.max())}


def _config_stats(name: str, shards: list[Path]) -> tuple[dict, dict[str, np.ndarray]]:
    schema = pq.read_schema(shards[0])
    columns = set(schema.names)
    sources = {w: _length_source(columns, w) for w in ("instruction", "response")}
    if not sources["instruction"][0]:
        raise DatasetDirError(f"config {name!r} has no instruction column (is this a magpie-hub dataset dir?)")
    scales = distributions()
    dists = [c for c in scales if c in columns]
    numeric = [c for c in numbers() if c in columns]
    wanted = sorted({s[0] for s in sources.values() if s[0]} | set(dists) | set(numeric))
    lengths: dict[str, list[np.ndarray]] = {w: [] for w in sources}
    values: dict[str, list[np.ndarray]] = {c: [] for c in numeric}
    counts: dict[str, Counter] = {c: Counter() for c in dists}
    missing: Counter = Counter()
    rows = 0
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=BATCH, columns=wanted):
            rows += batch.num_rows
            for which, (col, _unit) in sources.items():
                if not col:
                    continue
                arr = batch.column(col)
                if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
                    arr = pc.utf8_length(arr)
                lengths[which].append(arr.drop_null().to_numpy(zero_copy_only=False).astype(np.float64))
            for col in values:
                values[col].append(batch.column(col).drop_null().to_numpy(zero_copy_only=False).astype(np.float64))
            for col in dists:
                arr = batch.column(col)
                if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
                    arr = arr.cast(pa.string())
                missing[col] += arr.null_count
                for item in pc.value_counts(arr.drop_null()).to_pylist():
                    counts[col][item["values"]] += item["counts"]
    joined = {w: np.concatenate(v) if v else np.zeros(0) for w, v in lengths.items()}
    stats: dict = {"rows": rows, "shards": len(shards), "columns": sorted(columns)}
    for which, (col, unit) in sources.items():
        summary = _summary(joined[which]) if col else None      # None too for an empty config
        stats[f"{which}_length"] = {"unit": unit, "column": col, **summary} if summary else None
    for col, parts in values.items():
        stats[col] = _summary(np.concatenate(parts)) if parts else None
    stats["distributions"] = {}
    for col in dists:
        if not counts[col]:
            continue
        order = scales[col]
        keys = sorted(counts[col], key=lambda k: (order.index(k) if order and k in order else len(order or ()),
                                                  -counts[col][k], k))
        stats["distributions"][col] = {"counts": {k: counts[col][k] for k in keys}, "missing": missing[col]}
    return stats, joined


def compute_stats(directory: Path) -> dict:
    """Per-config statistics of a dataset directory (no plots, nothing written)."""
    return _compute(Path(directory))[0]


def _compute(directory: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    shards = config_shards(directory)
    if not shards:
        raise DatasetDirError(f"{directory} has no {{config}}/{SPLIT}-*.parquet shards (run magpie-hub build first)")
    configs, lengths = {}, {}
    for name, paths in shards.items():
        configs[name], lengths[name] = _config_stats(name, paths)
    for name, figures in dataset_diversity(directory, shards).items():
        if "pairwise" in figures:
            figures["pairwise"]["model"] = model_label(figures["pairwise"]["model"])
        configs[name]["diversity"] = figures
    return {"version": STATS_VERSION, "configs": configs}, lengths


# ---------------------------------------------------------------------------------------------- plots


def _figure(size=FIGSIZE):
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _label(text: object, width: int = 28) -> str:
    text = " ".join(str(text).split()).replace("$", r"\$")  # '$' would start mathtext
    return text if len(text) <= width else text[: width - 1] + "…"


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def _plot_lengths(which: str, stats: dict, lengths: dict, path: Path) -> bool:
    series = {c: v[which] for c, v in lengths.items() if v[which].size}
    if not series:
        return False
    units = {stats["configs"][c][f"{which}_length"]["unit"] for c in series}
    everything = np.concatenate(list(series.values()))
    hi = max(float(np.percentile(everything, 99)), 1.0)
    bins = np.linspace(0, hi, 41)
    fig = _figure()
    ax = fig.add_subplot()
    for config, values in series.items():
        ax.hist(np.clip(values, 0, hi), bins=bins, histtype="step", linewidth=1.6,
                label=f"{_label(config)} (n={values.size:,})")
    ax.set_xlabel(f"{which} length ({' / '.join(sorted(units))}; clipped at p99 = {hi:,.0f})")
    ax.set_ylabel("rows")
    ax.set_title(f"{which.capitalize()} length per config")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _plot_distribution(column: str, order: tuple[str, ...] | None, stats: dict, path: Path, top: int = 15) -> bool:
    per_config = {c: s["distributions"][column]["counts"] for c, s in stats["configs"].items()
                  if column in s.get("distributions", {})}
    if not per_config:
        return False
    total: Counter = Counter()
    for counts in per_config.values():
        total.update(counts)
    labels = [k for k in order if k in total] if order else [k for k, _ in total.most_common(top)]
    labels += [k for k, _ in total.most_common() if k not in labels][: max(0, top - len(labels))]
    fig = _figure()
    ax = fig.add_subplot()
    height = 0.8 / len(per_config)
    y = np.arange(len(labels))
    for i, (config, counts) in enumerate(per_config.items()):
        n = sum(counts.values()) or 1
        ax.barh(y + i * height, [100.0 * counts.get(k, 0) / n for k in labels], height=height,
                label=_label(config))
    ax.set_yticks(y + height * (len(per_config) - 1) / 2, [_label(k) for k in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of tagged rows (%)")
    ax.set_title(f"{column.replace('_', ' ').capitalize()} distribution")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: bars reach the edge
    _save(fig, path)
    return True


def _sample_instructions(shards: dict[str, list[Path]], stats: dict, max_points: int, seed: int,
                         hue_column: str | None) -> tuple[list[str], list[str], list[str | None]]:
    """Up to ``max_points`` rows drawn uniformly (seeded) over all configs: (instructions, hue labels, uuids)."""
    offsets, total = {}, 0
    for name in shards:
        offsets[name] = total
        total += stats["configs"][name]["rows"]
    take = np.sort(np.random.default_rng(seed).choice(total, size=min(max_points, total), replace=False))
    texts, hues, uuids = [], [], []
    for name, paths in shards.items():
        lo = offsets[name]
        want = take[(take >= lo) & (take < lo + stats["configs"][name]["rows"])] - lo
        present = stats["configs"][name]["columns"]
        cols = ["instruction"] + ([hue_column] if hue_column and hue_column in present else [])
        cols += ["uuid"] if "uuid" in present else []
        pos = 0
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH, columns=cols):
                idx = want[(want >= pos) & (want < pos + batch.num_rows)] - pos
                pos += batch.num_rows
                if not idx.size:
                    continue
                part = batch.take(pa.array(idx))
                texts += [t or "" for t in part.column("instruction").to_pylist()]
                uuids += part.column("uuid").to_pylist() if "uuid" in cols else [None] * part.num_rows
                hues += ([str(h) if h is not None else "(untagged)" for h in part.column(hue_column).to_pylist()]
                         if hue_column in cols else [name] * part.num_rows)
    return texts, hues, uuids


def _check_offline_model(model: str) -> None:
    """Offline, a Hub id must already be cached: fail in milliseconds, before importing the ML stack."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE or Path(model).expanduser().is_dir():
        return
    try:
        snapshot_download(model if "/" in model else f"sentence-transformers/{model}", local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        raise ModelError(f"cannot load the embedding model {model!r} for the t-SNE map (not cached and "
                         f"HF_HUB_OFFLINE is set); pass a local sentence-transformers directory") from None


def _embed(texts: list[str], model: str):
    _check_offline_model(model)
    try:
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(str(model), device="cpu")
    except Exception as exc:  # not cached offline, bad path, not a sentence-transformers model
        raise ModelError(f"cannot load the embedding model {model!r} for the t-SNE map "
                         f"({type(exc).__name__}); pass a local sentence-transformers directory") from None
    return encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


def _vectors(directory: Path, uuids: Sequence[str | None], texts: list[str], model: str) -> np.ndarray:
    """Embeddings of the sampled rows: the dedup step's saved vectors where ``model`` embedded these rows'
    texts; only the others (all of them without a dedup run) are embedded now."""
    vectors = saved_embeddings(directory, model, uuids, texts)
    todo = [i for i, v in enumerate(vectors) if v is None]
    if todo:
        for i, v in zip(todo, _embed([texts[i] for i in todo], model), strict=True):
            vectors[i] = v
    return np.stack([np.asarray(v, dtype=np.float32) for v in vectors])


def _plot_map(vectors: np.ndarray, hues: list[str], model: str, seed: int, path: Path) -> dict:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(vectors)
    perplexity = float(min(30.0, (n - 1) / 3))
    # One thread: deterministic sums, and on a shared 2-core machine 2x faster than contended OpenMP
    # (2,000 points, 500 iterations: 28 s vs 65 s under load). Exact gradients are cheaper for tiny maps.
    with threadpool_limits(limits=1):
        points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500,
                      method="exact" if n <= 200 else "barnes_hut").fit_transform(vectors)
    fig = _figure(MAP_FIGSIZE)
    ax = fig.add_subplot()
    groups = Counter(hues)
    for label, count in groups.most_common(12):
        mask = np.array([h == label for h in hues])
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, label=f"{_label(label)} ({count})")
    rest = np.array([h not in dict(groups.most_common(12)) for h in hues])
    if rest.any():
        ax.scatter(points[rest, 0], points[rest, 1], s=6, alpha=0.5, c="grey", label="other")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {n:,} instruction embeddings")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    _save(fig, path)
    return {"points": n, "perplexity": round(perplexity, 2), "model": model_label(model), "seed": seed}


def model_label(model: str) -> str:
    """A model id fit for a published file: Hub ids as they are, local paths shortened (no home dirs)."""
    path = Path(model)
    return f"local:{path.parent.name}/{path.name}" if path.is_dir() else model


def default_embedding_model(directory: Path) -> str:
    """The near-duplicate tag step's embedding model: its recorded ``model`` option, else the dedup step's
    own default (``$MAGPIE_HUB_EMBEDDING_MODEL``, else the paper's, or offline the MiniLM fallback)."""
    steps = (read_manifest(directory).get("tags") or {}).get("steps") or {}
    dedup_columns = set(registered(DedupStep.name).names)
    for info in steps.values():
        if isinstance(info, dict) and dedup_columns & set(info.get("columns") or ()):
            options = info.get("options") or {}
            for key in ("model", "embedding_model"):
                if isinstance(options.get(key), str) and options[key]:
                    return options[key]
    return dedup_embedding_model()


def analyze(directory: Path, *, embedding_model: str | os.PathLike | None = None,
            max_points: int = DEFAULT_MAX_POINTS, seed: int = 0, tsne: bool = True) -> dict:
    """Write ``magpie_stats.json`` and ``assets/*.png`` for ``directory``; return the statistics.

    ``embedding_model``: a sentence-transformers id or directory for the t-SNE map (ModelError if it
    cannot be loaded). Default: the near-duplicate step's model, else the dedup step's default (the paper's,
    or offline its MiniLM fallback); when that default cannot be loaded the map is skipped with a warning
    (the statistics do not need it). ``max_points`` caps the rows embedded; ``seed`` fixes the sample and the map.
    """
    directory = Path(directory)
    stats, lengths = _compute(directory)
    assets = directory / ASSETS_DIR
    written: dict[str, str] = {}
    for which in ("instruction", "response"):
        if _plot_lengths(which, stats, lengths, assets / f"{which}_length.png"):
            written[f"{which}_length"] = f"{ASSETS_DIR}/{which}_length.png"
    scales = distributions()
    for column, order in scales.items():
        if _plot_distribution(column, order, stats, assets / f"{column}.png"):
            written[column] = f"{ASSETS_DIR}/{column}.png"
    written.update(plot_mix(directory))   # configs built with mix targets: target vs achieved (card/mix_plot.py)
    total = sum(c["rows"] for c in stats["configs"].values())
    stats["tsne"] = None
    if tsne and total >= 5 and max_points >= 5:
        hue = "task_category" if "task_category" in written else None
        texts, hues, uuids = _sample_instructions(config_shards(directory), stats, max_points, seed, hue)
        model = str(embedding_model) if embedding_model is not None else default_embedding_model(directory)
        try:
            vectors = _vectors(directory, uuids, texts, model)
            stats["tsne"] = {**_plot_map(vectors, hues, model, seed, assets / "instruction_tsne.png"),
                             "color": hue or "config"}
            written["instruction_tsne"] = f"{ASSETS_DIR}/instruction_tsne.png"
        except ModelError as exc:
            if embedding_model is not None:
                raise
            stats["tsne"] = {"skipped": str(exc)}
            print(f"warning: {exc}; the card gets no t-SNE map", file=sys.stderr)
    ours = {"instruction_length", "response_length", "instruction_tsne", *scales}
    for stale in assets.glob("*.png") if assets.is_dir() else ():  # plots of columns that are gone
        if f"{ASSETS_DIR}/{stale.name}" not in written.values() and stale.stem in ours:
            stale.unlink()
    stats["assets"] = written
    atomic_write_text(directory / STATS, json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats
