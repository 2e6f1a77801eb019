"""Mix control benchmark (issue 11): natural mix vs blind weighted system prompts vs the closed loop.

Builds one mix config of a recipe three times on the same model, seed and N, changing only ``mix.mode``:

* ``natural``: no system prompt (MAGPIE as is), every row kept;
* ``blind``: a category / difficulty steering prompt drawn per row in proportion to the target shares
  (what distilabel's weighted system prompts do), every row kept;
* ``closed_loop``: generate -> classify -> accept into buckets -> steer (magpie_hub/build/mix.py).

The same classifier (the recipe's, default the offline MiniLM embedding classifier) measures each result,
so the comparison is: distance to target (sum over buckets of |achieved share - target share|, per
dimension) and generated tokens per accepted row (all tokens generated, dropped attempts and rejected
candidates included, over the rows kept)::

    HF_HUB_OFFLINE=1 nice -n 15 python scripts/bench_mix.py builders/mix-demo.yaml --rows 60 --out /tmp/bench-mix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

import magpie_hub.chat.demo_models  # noqa: F401 - registers tiny: models (an entry point, like the CLI)
import magpie_hub.gguf_models  # noqa: F401 - registers smollm2
from magpie_hub.build.run import run_build
from magpie_hub.recipe.load import load_recipe
from magpie_hub.tags.mix_classify import check_mix_labels, mix_classifiers

MODES = ("natural", "blind", "closed_loop")


def build_mode(recipe: Path, config: str, mode: str, rows: int, out: Path) -> dict:
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    data["name"] = f"{data.get('name', 'magpie')}-{mode.replace('_', '-')}"
    data["configs"] = {config: data["configs"][config]}
    data["configs"][config]["rows"] = rows
    data["configs"][config]["mix"]["mode"] = mode
    data.pop("tags", None)
    data.pop("filters", None)
    path = out / "recipes" / f"{mode}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    rec = load_recipe(path)
    check_mix_labels(rec)
    started = time.monotonic()
    result = run_build(rec, recipe_path=path, out=out / mode, mix_classifier=mix_classifiers(rec, out / mode))
    entry = result.manifest["configs"][config]
    wall = entry.get("wall_time_s") or round(time.monotonic() - started, 1)   # a finished mode is not rebuilt
    return {"mode": mode, "rows": rows, "wall_s": wall, **entry["mix"]}


def table(results: list[dict]) -> str:
    dims = list(results[0]["distance"])
    head = ["mode", "N", "candidates", "acceptance", *(f"distance {d}" for d in dims), "distance total",
            "gen. tokens / accepted row", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        dist = [r["distance"][d] for d in dims]
        lines.append("| " + " | ".join([r["mode"], str(r["rows"]), str(r["candidates"]),
                                        f"{r['acceptance_rate']:.0%}", *(f"{d:.3f}" for d in dist),
                                        f"{sum(dist):.3f}", f"{r['tokens_per_accepted_row']:,.0f}",
                                        f"{r['wall_s']:,.0f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--config", help="the mix config (default: the first with mix targets)")
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path("bench-mix"))
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    rec = load_recipe(args.recipe)
    config = args.config or next((n for n, c in rec.configs.items() if c.mix is not None), None)
    if config is None:
        print(f"error: {args.recipe} has no config with mix targets", file=sys.stderr)
        return 2
    results = []
    for mode in args.modes.split(","):
        results.append(build_mode(args.recipe, config, mode, args.rows, args.out))
        print(json.dumps({k: results[-1][k] for k in ("mode", "candidates", "distance", "tokens_per_accepted_row",
                                                      "wall_s")}), flush=True)
    (args.out / "bench_mix.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
