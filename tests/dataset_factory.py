"""Small dataset directories in the layout of docs/architecture.md, written with ``datasets`` (card and
analysis tests). Rows are seeded; tag columns are optional; any row or label text can be injected."""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset, Value

from magpie_hub.dataset.schema import GENERATION_FEATURES
from magpie_hub.layout import MANIFEST

WORDS = ("apple banana code python math solve write story explain why how list the river mountain data "
         "graph translate proof garden solar contrast summary").split()
TASKS = ("Information seeking", "Math", "Coding & Debugging", "Creative writing")
DIFFICULTY = ("very easy", "easy", "medium", "hard", "very hard", None)
QUALITY = ("poor", "average", "good", "excellent")
LANGS = ("EN", "EN", "EN", "FR", "DE")   # as lingua and the official releases write them


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_rows(config: str, n: int, *, turns: int = 1, seed: int = 0, tagged: bool = False,
              inject: dict[int, dict] | None = None) -> list[dict]:
    rng = random.Random(f"{seed}/{config}")
    rows = []
    for i in range(n):
        ins, res = _text(rng, 3, 25), _text(rng, 5, 80)
        row = {"uuid": f"{config}-{i:05d}", "model": "tiny:llama3",
               "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "seed": i,
                                     "pre_query_template": "<|begin_of_text|>", "input_generator": "tiny:llama3"},
               "instruction": ins, "response": res,
               "conversations": [{"from": "human", "value": ins}, {"from": "gpt", "value": res}],
               "messages": [{"role": "user", "content": ins}, {"role": "assistant", "content": res}],
               "turns": turns, "category": None}
        if tagged:
            row.update(instruction_length=len(ins.split()), response_length=len(res.split()),
                       language=rng.choice(LANGS), task_category=rng.choice(TASKS),
                       difficulty=rng.choice(DIFFICULTY), input_quality=rng.choice(QUALITY))
        row.update((inject or {}).get(i, {}))
        rows.append(row)
    return rows


TAG_FEATURES = {"instruction_length": Value("int64"), "response_length": Value("int64"),
                "language": Value("string"), "task_category": Value("string"),
                "difficulty": Value("string"), "input_quality": Value("string")}


def write_config(directory: Path, config: str, rows: list[dict], shards: int = 2) -> list[Path]:
    features = GENERATION_FEATURES.copy()
    if "task_category" in rows[0]:
        features.update(TAG_FEATURES)
    ds = Dataset.from_list(rows, features=features)
    folder = Path(directory) / config
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shards):
        path = folder / f"train-{k:05d}-of-{shards:05d}.parquet"
        ds.shard(shards, k, contiguous=True).to_parquet(str(path))
        paths.append(path)
    return paths


def make_dataset(directory: Path, *, tagged: bool = False, sizes: dict[str, int] | None = None,
                 manifest: dict | None = None, inject: dict[str, dict[int, dict]] | None = None) -> Path:
    directory = Path(directory)
    sizes = sizes or {"single_turn": 60, "multi_turn": 40}
    for config, n in sizes.items():
        rows = make_rows(config, n, turns=2 if config == "multi_turn" else 1, tagged=tagged,
                         inject=(inject or {}).get(config))
        write_config(directory, config, rows)
    data = demo_manifest(sizes) if manifest is None else manifest
    (directory / MANIFEST).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return directory


def demo_manifest(sizes: dict[str, int], model: str = "tiny:llama3", card: dict | None = None) -> dict:
    """A manifest shaped like the one magpie_hub.build.manifest writes."""
    return {
        "magpie_hub": "0.1.0", "created_at": "2026-01-01T00:00:00+00:00",
        "recipe": {"name": "magpie-test", "description": "test build", "model": model, "seed": 42,
                   "instruction_sampling": [{"temperature": 1.0, "top_p": 1.0, "share": 0.6},
                                            {"temperature": 1.1, "top_p": 0.995, "share": 0.4}],
                   "response_sampling": {"temperature": 0.0, "top_p": 1.0},
                   "configs": {c: {"rows": n, "turns": 2 if c == "multi_turn" else 1} for c, n in sizes.items()},
                   "card": card or {}},
        "model": {"id": model, "revision": None, "sha": "0123456789abcdef0123456789abcdef01234567",
                  "backend": "transformers"},
        "backend": {"name": "transformers", "options": {}},
        "templates": {"pre_query": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
                      "post_query": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                      "stop": ["<|eot_id|>"]},
        "versions": {"datasets": "5.2.0", "torch": "2.13.0"},
        "device": {"kind": "cpu", "name": "x86_64", "processes": 2},
        "card": card or {},
        "configs": {c: {"rows": n, "dropped": {"truncated": 2}, "generated_tokens": 1000 + n,
                        "device_hours": 0.0125, "wall_time_s": 22.5} for c, n in sizes.items()},
    }
