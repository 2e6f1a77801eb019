"""The card's mix plot: per config built with mix targets (manifest ``configs.{name}.mix``), target vs
achieved share of rows per bucket, one panel per dimension (task category, difficulty)."""

from __future__ import annotations

import re
from pathlib import Path

from magpie_hub.dataset.directory import atomic_path, read_manifest
from magpie_hub.layout import ASSETS_DIR

DPI = 100


def mix_asset_name(config: str) -> str:
    return "mix_" + re.sub(r"[^A-Za-z0-9_-]", "_", config)


def plot_mix(directory: Path) -> dict[str, str]:
    """Draw ``assets/mix_{config}.png`` for every config with a mix report; {asset name: relative path}."""
    from matplotlib.figure import Figure  # matplotlib is slow to import: only when a card is drawn

    written: dict[str, str] = {}
    for config, entry in sorted((read_manifest(directory).get("configs") or {}).items()):
        mix = (entry or {}).get("mix")
        if not mix or not mix.get("buckets"):
            continue
        dims = list(mix["buckets"])
        fig = Figure(figsize=(9.0, 2.0 + 0.45 * sum(len(b) for b in mix["buckets"].values())), dpi=DPI,
                     layout="constrained")
        axes = fig.subplots(len(dims), 1, squeeze=False)[:, 0]
        for ax, dim in zip(axes, dims, strict=True):
            buckets = mix["buckets"][dim]
            labels = list(buckets)
            y = range(len(labels))
            ax.barh([i - 0.2 for i in y], [100 * buckets[k]["target_share"] for k in labels], height=0.4,
                    label="target", color="#bbbbbb")
            ax.barh([i + 0.2 for i in y], [100 * buckets[k]["share"] for k in labels], height=0.4,
                    label="achieved", color="#1f77b4")
            ax.set_yticks(list(y), [str(k).replace("$", r"\$")[:28] for k in labels], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel("share of rows (%)")
            ax.set_title(f"{config}: {dim.replace('_', ' ')} (classifier: {mix['classifier'].get('name')}, "
                         f"tolerance ±{100 * mix['tolerance']:.1f} points)", fontsize=9)
            ax.legend(fontsize=8, loc="lower right")
        name = mix_asset_name(config)
        with atomic_path(Path(directory) / ASSETS_DIR / f"{name}.png", suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
        written[name] = f"{ASSETS_DIR}/{name}.png"
    return written


__all__ = ["mix_asset_name", "plot_mix"]
