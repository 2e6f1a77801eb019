"""What was published: ``magpie-hub versions ORG/NAME`` and ``magpie-hub diff ORG/NAME vA vB``.

Every read is pinned to the tag's commit sha (resolved once from the repo's refs), so a listing or a diff
never mixes two states of a branch. Rows per config come from the card's ``dataset_info`` at that commit
(the Hub's ``cardData``); when a card has none, from the Parquet footers. The diff reads Parquet through
``HfFileSystem`` (range requests: footers for rows and columns, then only the tag columns, batch by
batch, so memory stays flat in the dataset size) and reports configs added/removed, rows, columns and
the shift of the label distributions the column registry (:mod:`magpie_hub.tags`) marks ``diff``.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from magpie_hub.errors import HubError
from magpie_hub.hub.client import call, endpoint, hub_api, resolve_token
from magpie_hub.hub.publish import REPO_TYPE
from magpie_hub.layout import REPO_RE, SPLIT
from magpie_hub.tags import registered_columns

TOP_VALUES = 12
_SEMVER = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


@dataclass
class ConfigSummary:
    rows: int
    columns: list[str]
    distributions: dict[str, Counter] = field(default_factory=dict)


@dataclass
class Snapshot:
    tag: str
    commit: str
    date: str
    card: dict
    files: list[str]


def distribution_columns() -> tuple[str, ...]:
    """The columns whose distribution shift a diff reports (registry ``diff``), by name."""
    return tuple(sorted(c.name for c in registered_columns().values() if c.diff))


def _version_key(tag: str):
    m = _SEMVER.match(tag)
    return (0, tuple(int(x) for x in m.groups()), "") if m else (1, (), tag)


def _client(repo: str):
    if not REPO_RE.match(repo or ""):
        raise HubError(f"{repo!r} is not ORG/NAME (e.g. my-org/magpie-pro)")
    token = resolve_token()
    return hub_api(token), token


def _tags(api, repo: str) -> dict[str, str]:
    refs = call(f"reading the tags of {repo}", repo, api.list_repo_refs, repo, repo_type=REPO_TYPE)
    return {t.name: t.target_commit for t in refs.tags}


def snapshot(api, repo: str, tag: str, commit: str) -> Snapshot:
    info = call(f"reading {repo}@{tag}", repo, api.repo_info, repo, repo_type=REPO_TYPE, revision=commit,
                files_metadata=False)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    date = info.last_modified.strftime("%Y-%m-%d %H:%M UTC") if info.last_modified else "?"
    return Snapshot(tag, commit, date, card, sorted(s.rfilename for s in info.siblings or []))


def card_rows(card: dict) -> dict[str, int]:
    """Rows per config from the card's ``dataset_info`` (a mapping for one config, a list for several)."""
    infos = card.get("dataset_info") or []
    out = {}
    for info in [infos] if isinstance(infos, dict) else infos:
        if isinstance(info, dict) and isinstance(info.get("splits"), list):
            out[info.get("config_name", "default")] = sum(int(s.get("num_examples") or 0) for s in info["splits"])
    return out


def _patterns(data_files) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    out = []
    for item in data_files or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and item.get("split", SPLIT) == SPLIT:
            paths = item.get("path")
            out += [paths] if isinstance(paths, str) else list(paths or [])
    return out


def config_files(snap: Snapshot) -> dict[str, list[str]]:
    """Parquet files of each config: the card's ``configs`` patterns, else ``{config}/train-*.parquet``."""
    parquet = [f for f in snap.files if f.endswith(".parquet")]
    configs = snap.card.get("configs")
    if isinstance(configs, list) and configs:
        out = {}
        for c in configs:
            if isinstance(c, dict) and c.get("config_name"):
                pats = _patterns(c.get("data_files"))
                out[c["config_name"]] = [f for f in parquet if any(fnmatch.fnmatch(f, p) for p in pats)]
        return out
    out: dict[str, list[str]] = {}
    for f in parquet:
        parts = f.split("/")
        if len(parts) == 2 and parts[1].startswith(f"{SPLIT}-"):
            out.setdefault(parts[0], []).append(f)
    return out


class ParquetReader:
    """Parquet files of one repo commit read through HfFileSystem (range requests only)."""

    def __init__(self, repo: str, commit: str, token: str | None):
        from huggingface_hub import HfFileSystem

        self.fs = HfFileSystem(endpoint=endpoint(), token=token, skip_instance_cache=True)
        self.repo, self.commit = repo, commit

    def _open(self, path: str):
        return self.fs.open(f"datasets/{self.repo}@{self.commit}/{path}", "rb", block_size=1 << 20)

    def summarize(self, paths: list[str], distributions: bool) -> ConfigSummary:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        rows, columns, dists = 0, [], {}
        for path in paths:
            def read(path=path):
                with self._open(path) as fh:
                    pf = pq.ParquetFile(fh)
                    names = pf.schema_arrow.names
                    counts: dict[str, Counter] = {}
                    wanted = [c for c in distribution_columns() if c in names] if distributions else []
                    for batch in (pf.iter_batches(columns=wanted, batch_size=65536) if wanted else []):
                        for name in wanted:
                            for item in pc.value_counts(batch.column(name)).to_pylist():
                                key = "(none)" if item["values"] is None else str(item["values"])
                                counts.setdefault(name, Counter())[key] += item["counts"]
                    return pf.metadata.num_rows, names, counts

            n, names, counts = call(f"reading {self.repo}@{self.commit[:12]}/{path}", self.repo, read)
            rows += n
            columns = columns or names
            for name, c in counts.items():
                dists.setdefault(name, Counter()).update(c)
        return ConfigSummary(rows, columns, dists)


def list_versions(repo: str, console: Console | None = None) -> list[dict]:
    """Print (rich table) and return every tag with commit, date and rows per config."""
    console = console or Console(highlight=False)
    api, token = _client(repo)
    tags = _tags(api, repo)
    out = []
    for tag in sorted(tags, key=_version_key):
        snap = snapshot(api, repo, tag, tags[tag])
        rows = card_rows(snap.card)
        files = config_files(snap)
        if set(rows) != set(files):  # no (or a stale) dataset_info: count from the Parquet footers
            reader = ParquetReader(repo, snap.commit, token)
            rows = {name: reader.summarize(paths, distributions=False).rows for name, paths in files.items()}
        out.append({"version": tag, "commit": snap.commit, "date": snap.date, "rows": dict(sorted(rows.items()))})
    if not out:
        console.print(f"{repo} has no version tags yet; publish one with `magpie-hub publish DIR --repo {repo} "
                      f"--version v1.0.0`")
        return out
    table = Table(title=f"versions of {repo}")
    for col, kw in (("version", {}), ("commit", {}), ("date", {}), ("rows per config", {"overflow": "fold"}),
                    ("total rows", {"justify": "right"})):
        table.add_column(col, **kw)
    for v in out:
        table.add_row(v["version"], v["commit"][:12], v["date"],
                      ", ".join(f"{k}: {n:,}" for k, n in v["rows"].items()), f"{sum(v['rows'].values()):,}")
    console.print(table)
    return out


def _shares(c: Counter) -> dict[str, float]:
    total = sum(c.values()) or 1
    return {k: n / total for k, n in c.items()}


def diff_versions(repo: str, a: str, b: str, console: Console | None = None) -> dict:
    """Print and return the differences between two published versions of ``repo``."""
    console = console or Console(highlight=False)
    api, token = _client(repo)
    tags = _tags(api, repo)
    for v in (a, b):
        if v not in tags:
            known = ", ".join(sorted(tags, key=_version_key)) or "none"
            raise HubError(f"{repo} has no version {v!r} (tags: {known}); see `magpie-hub versions {repo}`")
    summaries = {}
    for v in (a, b):
        snap = snapshot(api, repo, v, tags[v])
        reader = ParquetReader(repo, snap.commit, token)
        summaries[v] = {name: reader.summarize(paths, distributions=True)
                        for name, paths in config_files(snap).items()}
    old, new = summaries[a], summaries[b]
    result = {"a": a, "b": b, "commits": {a: tags[a], b: tags[b]},
              "configs_added": sorted(set(new) - set(old)), "configs_removed": sorted(set(old) - set(new)),
              "configs": {}}
    console.print(f"diff {repo}: {a} ({tags[a][:12]}) -> {b} ({tags[b][:12]})")
    console.print(f"configs added: {', '.join(result['configs_added']) or 'none'}; "
                  f"removed: {', '.join(result['configs_removed']) or 'none'}")
    table = Table(title="rows and columns per config")
    for col in ("config", f"rows {a}", f"rows {b}", "change", "columns added", "columns removed"):
        table.add_column(col, overflow="fold")
    for name in sorted(set(old) | set(new)):
        o, n = old.get(name), new.get(name)
        entry = {"rows": [o.rows if o else None, n.rows if n else None],
                 "columns_added": sorted(set(n.columns) - set(o.columns)) if o and n else [],
                 "columns_removed": sorted(set(o.columns) - set(n.columns)) if o and n else [],
                 "distributions": {}}
        change = f"{n.rows - o.rows:+,}" if o and n else ("added" if n else "removed")
        table.add_row(name, f"{o.rows:,}" if o else "-", f"{n.rows:,}" if n else "-", change,
                      ", ".join(entry["columns_added"]) or "-", ", ".join(entry["columns_removed"]) or "-")
        for col in distribution_columns() if o and n else ():  # shifts only for configs in both versions
            if col not in o.distributions and col not in n.distributions:
                continue
            sa = _shares(o.distributions.get(col, Counter()))
            sb = _shares(n.distributions.get(col, Counter()))
            keys = sorted(set(sa) | set(sb), key=lambda k: (-abs(sb.get(k, 0) - sa.get(k, 0)), k))
            entry["distributions"][col] = {
                "shares": {k: [sa.get(k, 0.0), sb.get(k, 0.0)] for k in keys},
                "total_variation": 0.5 * sum(abs(sb.get(k, 0) - sa.get(k, 0)) for k in keys)}
        result["configs"][name] = entry
    console.print(table)
    for name, entry in result["configs"].items():
        for col, dist in entry["distributions"].items():
            if dist["total_variation"] == 0:
                console.print(f"{name} / {col}: distribution unchanged")
                continue
            console.print(f"{name} / {col}: shift (total variation {dist['total_variation']:.3f})")
            t = Table()
            for head in ("value", a, b, "change (pp)"):
                t.add_column(head, justify="left" if head == "value" else "right", overflow="fold")
            for k, (x, y) in list(dist["shares"].items())[:TOP_VALUES]:
                t.add_row(k, f"{100 * x:.1f}%", f"{100 * y:.1f}%", f"{100 * (y - x):+.1f}")
            console.print(t)
    return result
