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

import re
from pathlib import Path

README = "README.md"
MANIFEST = "magpie_manifest.json"
STATS = "magpie_stats.json"          # statistics written by the analysis stage, read by the card
ASSETS_DIR = "assets"                # PNG plots written by the analysis stage, embedded by the card
WORK_DIR = ".magpie"                 # checkpoints and other local state; never published
SPLIT = "train"

# How a published dataset is named: ``ORG/NAME`` and a release tag ``vMAJOR.MINOR.PATCH`` (the card pins its
# loading snippet to exactly what publish accepts).
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


def shard_name(index: int, count: int) -> str:
    return f"{SPLIT}-{index:05d}-of-{count:05d}.parquet"


def split_rows(rows: int, shards: int) -> list[int]:
    """Rows per shard: ``rows`` spread over ``shards`` files, the first ones taking the remainder."""
    base, extra = divmod(rows, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def shard_paths(directory: Path, config: str) -> list[Path]:
    return sorted((Path(directory) / config).glob(f"{SPLIT}-*-of-*.parquet"))


def config_names(directory: Path) -> list[str]:
    """Configs of a dataset dir (sub-folders holding ``train-*.parquet``), sorted = the global row order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and shard_paths(directory, p.name))
