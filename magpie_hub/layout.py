"""The layout of a dataset directory (identical to the Hub repo it becomes): every name in one place.

```
README.md                               the card
magpie_manifest.json                    what was built, from what, at what cost (and what tag/filter did)
magpie_stats.json                       statistics for the card
assets/*.png                            plots for the card
{config}/train-0000i-of-0000n.parquet   the rows
.magpie/                                local state (checkpoints, embeddings); never published
```
No ``datasets`` import here: the CLI, the Hub client and the card read these names cheaply.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

README = "README.md"
MANIFEST = "magpie_manifest.json"
STATS = "magpie_stats.json"          # statistics written by the analysis stage, read by the card
ASSETS_DIR = "assets"                # PNG plots written by the analysis stage, embedded by the card
WORK_DIR = ".magpie"                 # checkpoints and other local state; never published
SPLIT = "train"
LOCK = "lock"                        # DIR/.magpie/lock: the writer holding the directory (build, tag, filter)
TMP_DIR = "tmp"                      # DIR/.magpie/tmp/: staging folders of the shard writer
DATA_DIR = "data"                    # the Hub's conventional data folder: never a config name

RESERVED_NAMES = frozenset({README, MANIFEST, STATS, ASSETS_DIR, WORK_DIR, DATA_DIR, ".git", ".gitattributes",
                            ".huggingface", ".cache", ".env"})
"""Names a config may not take (it becomes a top-level folder of the dataset directory / Hub repo)."""

# How a published dataset is named: ``ORG/NAME`` and a release tag ``vMAJOR.MINOR.PATCH`` (the card pins its
# loading snippet to exactly what publish accepts).
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


def lock_path(directory: Path) -> Path:
    return Path(directory) / WORK_DIR / LOCK


def output_lock_path(out: Path) -> Path:
    """The lock of a directory written by replacing it whole (a filter's ``--out``): a hidden sibling."""
    return Path(out).parent / f".{Path(out).name}.{LOCK}"


def is_reserved_config(name: str) -> bool:
    """True when ``name`` would collide with a file or folder of the layout (any case, as on the Hub)."""
    lowered = name.lower()
    return lowered in {n.lower() for n in RESERVED_NAMES} or lowered.startswith(".")


STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)?-?[^/]*$")
"""A filter's hidden sibling of ``--out``: ``.{out}.tmp-{pid}-XXXX`` while written, ``.{out}.old-{pid}`` while
swapped; a killed filter's are removed by the next filter into the same ``--out``."""


def staging_prefix(out: Path, kind: str = "tmp") -> str:
    return f".{Path(out).name}.{kind}-{os.getpid()}-"


def shard_name(index: int, count: int) -> str:
    return f"{SPLIT}-{index:05d}-of-{count:05d}.parquet"


def split_rows(rows: int, shards: int) -> list[int]:
    """Rows per shard: ``rows`` spread over ``shards`` files, the first ones taking the remainder."""
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


SHARD_RE = re.compile(rf"^{SPLIT}-(\d{{5}})-of-(\d{{5}})\.parquet$")


def shard_paths(directory: Path, config: str) -> list[Path]:
    return sorted((Path(directory) / config).glob(f"{SPLIT}-*-of-*.parquet"))


def config_names(directory: Path) -> list[str]:
    """Configs of a dataset dir (sub-folders holding ``train-*.parquet``), sorted = the global row order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and shard_paths(directory, p.name))
