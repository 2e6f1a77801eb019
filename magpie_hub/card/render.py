"""Dataset card (``DIR/README.md``): YAML header via huggingface_hub/datasets, body from Jinja2 templates.

The header is built with :class:`huggingface_hub.DatasetCardData` plus the ``datasets`` helpers that own
the ``configs`` / ``dataset_info`` formats (so ``load_dataset(DIR, config)`` reads exactly this). The body
comes from ``cards/dataset_card.md.j2`` (packaged as ``magpie_hub/card/templates``). Every value that comes from the
generated data, the manifest or the recipe passes through an escaping filter (:mod:`magpie_hub.card.text`):
no YAML, HTML or Markdown it contains can alter the card. The rendered card is parsed back and validated
before it atomically replaces ``README.md``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq
from datasets import DatasetInfo, Features, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from magpie_hub.card import text as card_text
from magpie_hub.card.licenses import combine_licenses, is_demo_model, license_for_model, license_from_override
from magpie_hub.card.stats import compute_stats, model_label
from magpie_hub.dataset.directory import atomic_path, read_manifest
from magpie_hub.errors import DatasetDirError, RecipeError
from magpie_hub.layout import ASSETS_DIR, README, REPO_RE, SPLIT, STATS, VERSION_RE, config_names, shard_paths

TEMPLATE = "dataset_card.md.j2"
REPO_PLACEHOLDER = "ORG/NAME"       # shown in the loading snippet until the publisher passes repo=
VERSION_PLACEHOLDER = "vX.Y.Z"      # ... and version=
DEFAULT_CONFIG = "single_turn"
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
_LANG_RE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
_TASK_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_ASSET_RE = re.compile(rf"^{ASSETS_DIR}/[A-Za-z0-9_-]+\.png$")


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1B"


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(Path(__file__).with_name("templates"))), autoescape=False,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(card_text.FILTERS)
    env.globals.update(card_text.GLOBALS)
    return env


# ------------------------------------------------------------------------------------------ shards


def _config_info(directory: Path, name: str) -> dict:
    """Features, rows, bytes of one config from its parquet footers (no data read)."""
    shards = shard_paths(directory, name)
    schema = pq.read_schema(shards[0])
    rows = num_bytes = 0
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        if not meta.schema.to_arrow_schema().equals(schema, check_metadata=False):
            raise DatasetDirError(f"{shard} has other columns than {shards[0].name}; re-run the stage that wrote "
                                  f"config {name!r} so its shards agree")
        rows += meta.num_rows
        num_bytes += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return {"name": name, "features": Features.from_arrow_schema(schema), "rows": rows, "num_bytes": num_bytes,
            "download_size": sum(s.stat().st_size for s in shards), "shards": len(shards)}


def _load_stats(directory: Path, infos: dict[str, dict]) -> tuple[dict, bool]:
    """``magpie_stats.json`` when it describes exactly these shards (fresh), else computed now."""
    path = directory / STATS
    if path.exists():
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
            rows = {n: c.get("rows") for n, c in stats.get("configs", {}).items()}
            if rows == {n: i["rows"] for n, i in infos.items()}:
                return stats, True
        except (OSError, ValueError, AttributeError):
            pass
    return compute_stats(directory), False


def _drawn_map(stats: dict) -> dict | None:
    tsne = stats.get("tsne")
    return tsne if isinstance(tsne, dict) and "points" in tsne else None


def _example(directory: Path, name: str, limit: int = 400) -> dict | None:
    shard = shard_paths(directory, name)[0]
    cols = [c for c in ("instruction", "response") if c in pq.read_schema(shard).names]
    if not cols:
        return None
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=1, columns=cols):
        row = batch.to_pylist()[0]
        return {k: card_text.truncate(row.get(k) or "", limit) for k in ("instruction", "response")}
    return None


# ------------------------------------------------------------------------------------------ header


def _model(manifest: dict) -> tuple[str | None, str | None]:
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    model = manifest.get("model") or recipe.get("model")
    revision = manifest.get("revision") or manifest.get("model_revision") or manifest.get("model_sha")
    if isinstance(model, dict):
        revision = revision or model.get("sha") or model.get("revision")
        model = model.get("id") or model.get("name")
    revision = revision or recipe.get("revision")
    return (model_label(str(model)) if model else None), (str(revision) if revision else None)


def _card_options(manifest: dict) -> dict:
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    options = manifest.get("card") or recipe.get("card") or {}
    return options if isinstance(options, dict) else {}


def _override_list(options: dict, key: str, pattern: re.Pattern, what: str) -> list[str] | None:
    """The recipe's ``card.<key>`` (a string or a list) checked against ``pattern``; None when unset."""
    given = options.get(key)
    if not given:
        return None
    values = [given] if isinstance(given, str) else list(given)
    bad = [x for x in values if not isinstance(x, str) or not pattern.match(x)]
    if bad:
        raise RecipeError(f"card.{key} {bad[0]!r} is not {what}")
    return values


def _languages(stats: dict, options: dict) -> list[str]:
    given = _override_list(options, "language", _LANG_RE, "an ISO 639 code; use e.g. en or [en, fr]")
    if given:
        return given
    counts: dict[str, int] = {}
    for cfg in stats["configs"].values():
        for code, n in (cfg.get("distributions", {}).get("language", {}).get("counts") or {}).items():
            code = str(code).lower()        # lingua / the official releases write "EN"; the Hub wants "en"
            counts[code] = counts.get(code, 0) + n
    total = sum(counts.values())
    keep = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            if re.fullmatch(r"[a-z]{2}", c) and n >= 0.01 * total]
    return keep[:50]


def _task_categories(stats: dict, options: dict) -> list[str]:
    given = _override_list(options, "task_categories", _TASK_RE, "a Hub task id; use e.g. text-generation")
    if given:
        return given
    tasks = ["text-generation"]
    labels: set[str] = set()
    for cfg in stats["configs"].values():
        for col in ("task_category", "category"):
            labels |= set(cfg.get("distributions", {}).get(col, {}).get("counts") or {})
    if labels & {"Information seeking", "Advice seeking"}:
        tasks.append("question-answering")
    if "translation" in labels:
        tasks.append("translation")
    return tasks


def _default_config(names: list[str]) -> str:
    return DEFAULT_CONFIG if DEFAULT_CONFIG in names else names[0]


def _header(infos: dict[str, dict], stats: dict, manifest: dict, model: str | None, lic) -> DatasetCardData:
    options = _card_options(manifest)
    names = list(infos)
    default = _default_config(names)
    total = sum(i["rows"] for i in infos.values())
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    pretty = card_text.one_line(options.get("pretty_name") or recipe.get("name") or "MAGPIE dataset", 100)
    data = DatasetCardData(
        pretty_name=pretty, size_categories=[size_category(total)],
        task_categories=_task_categories(stats, options), annotations_creators=["machine-generated"],
        language_creators=["machine-generated"], source_datasets=["original"],
        tags=list(dict.fromkeys(["synthetic", "magpie", "magpie-hub", *([model] if model else [])])),
        **({"language": langs} if (langs := _languages(stats, options)) else {}),
        **lic.card_fields(),
    )
    MetadataConfigs({n: {"data_files": [{"split": SPLIT, "path": f"{n}/{SPLIT}-*.parquet"}],
                         **({"default": True} if n == default else {})} for n in names}
                    ).to_dataset_card_data(data)
    DatasetInfosDict({n: DatasetInfo(features=i["features"], download_size=i["download_size"],
                                      dataset_size=i["num_bytes"],
                                      splits=SplitDict({SPLIT: SplitInfo(name=SPLIT, num_bytes=i["num_bytes"],
                                                                         num_examples=i["rows"])}))
                      for n, i in infos.items()}).to_dataset_card_data(data)
    return data


# ------------------------------------------------------------------------------------------ render


def render_card(directory: Path, *, repo: str | None = None, version: str | None = None) -> Path:
    """Render and validate ``DIR/README.md``; ``repo``/``version`` pin the loading snippet (publisher)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetDirError(f"{directory} is not a directory (give a dataset directory written by build)")
    if repo is not None and not REPO_RE.match(repo):
        raise DatasetDirError(f"repo {repo!r} is not ORG/NAME")
    if version is not None and not VERSION_RE.match(version):
        raise DatasetDirError(f"version {version!r} is not vX.Y.Z")
    names = config_names(directory)
    if not names:
        raise DatasetDirError(f"{directory} has no config with {SPLIT}-*.parquet shards; run magpie-hub build "
                              f"first (or give the dataset directory itself)")
    infos = {n: _config_info(directory, n) for n in names}
    manifest = read_manifest(directory)
    stats, fresh = _load_stats(directory, infos)
    model, revision = _model(manifest)
    options = _card_options(manifest)
    try:
        lic = license_from_override(options, model) or combine_licenses(   # responses from another model too
            [license_for_model(model)] + [license_from_override({"license": own}, rm) if own else license_for_model(rm)
                                          for rm, own in card_text.response_model_ids(manifest)])
    except ValueError as exc:
        raise RecipeError(f"{exc} in the recipe's card: section") from None
    header = _header(infos, stats, manifest, model, lic)
    assets = [(key, rel) for key, rel in (stats.get("assets") or {}).items()
              if fresh and isinstance(rel, str) and _ASSET_RE.match(rel) and (directory / rel).is_file()]
    context = {
        "header": header, "title": header.pretty_name, "model": model, "revision": revision,
        "demo": is_demo_model(model) or manifest.get("demo") is True, "license": lic,
        "repo": repo or REPO_PLACEHOLDER, "version": version or VERSION_PLACEHOLDER,
        "pinned": bool(repo and version), "default_config": _default_config(names),
        "configs": [{**infos[n], "stats": stats["configs"].get(n, {}),
                     "build": card_text.mapping((manifest.get("configs") or {}).get(n)),
                     "example": _example(directory, n)} for n in names],
        "total_rows": sum(i["rows"] for i in infos.values()),
        "provenance": card_text.provenance(manifest),
        "filter": card_text.filter_summary(manifest.get("filter")),
        "family": card_text.family(manifest),
        "assets": assets, "tsne": _drawn_map(stats) if fresh else None,
        "notes": [card_text.one_line(str(n), 400) for n in options.get("notes") or [] if str(n).strip()],
    }
    body = _environment().get_template(TEMPLATE).render(**context)
    text = f"---\n{header.to_yaml()}\n---\n\n{body.lstrip()}"
    return _write_validated(directory / README, text, infos)


def _write_validated(path: Path, text: str, infos: dict[str, dict]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        validate_card(tmp, infos)
    return path


def validate_card(path: Path, infos: dict[str, dict] | None = None) -> DatasetCard:
    """Parse a rendered card back and check what the Hub and ``datasets`` need (no network).

    YAML header parses; ``configs`` is valid for ``datasets`` with one default and matches the config
    dirs; ``dataset_info`` round-trips with the right rows/features; license and size are set; the body
    has no raw HTML outside code blocks. Raises DatasetDirError naming the problem.
    """
    try:
        card = DatasetCard.load(path)
        data = card.data
        configs = MetadataConfigs.from_dataset_card_data(data)
        configs.get_default_config_name()
        ds_infos = DatasetInfosDict.from_dataset_card_data(data)
    except Exception as exc:
        raise DatasetDirError(f"rendered card {path.name} does not parse: {card_text.one_line(str(exc), 200)}") \
            from None
    problems = []
    if not configs:
        problems.append("no configs")
    if not data.get("license") or (data.get("license") == "other" and not data.get("license_name")):
        problems.append("no license (or 'other' without license_name)")
    if not data.get("size_categories"):
        problems.append("no size_categories")
    if infos is not None:
        if set(configs) != set(infos) or set(ds_infos) != set(infos):
            problems.append(f"configs {sorted(configs)} != config dirs {sorted(infos)}")
        for name, info in infos.items():
            got = ds_infos.get(name)
            if got is None or got.splits[SPLIT].num_examples != info["rows"] or got.features != info["features"]:
                problems.append(f"dataset_info of {name!r} does not match its shards")
    html = card_text.raw_html(card.text)
    if html:
        problems.append(f"raw HTML in the body: {html!r}")
    if problems:
        raise DatasetDirError(f"rendered card failed validation: {'; '.join(problems)}")
    return card
