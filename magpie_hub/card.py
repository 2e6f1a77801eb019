"""Dataset card (README.md) rendering. Minimal placeholder: writes the YAML ``configs:`` only.

To be replaced by the full Jinja2-template card (issue 4); the function signature stays.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from magpie_hub.schema import README, SPLIT


def config_names(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.is_dir() and any(p.glob(f"{SPLIT}-*.parquet")))


def render_card(directory: Path) -> Path:
    directory = Path(directory)
    names = config_names(directory)
    configs = [
        {"config_name": n, "data_files": [{"split": SPLIT, "path": f"{n}/{SPLIT}-*.parquet"}],
         **({"default": True} if i == 0 else {})}
        for i, n in enumerate(names)
    ]
    data = DatasetCardData(configs=configs, tags=["synthetic", "magpie"])
    card = DatasetCard(f"---\n{data.to_yaml()}\n---\n\n# MAGPIE dataset\n")
    path = directory / README
    path.write_text(str(card), encoding="utf-8")
    return path
