"""The build orchestration end to end on the deterministic dummy backend (real engine, real chat format).

Exact rows per config, load_dataset per config, determinism, changed recipe / --fresh, kill -9 + resume,
2-process torchrun, the datasets builder API, shards and checkpoint pieces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env

from magpie_hub import pipeline
from magpie_hub.build.checkpoint import Checkpoint, PieceWriter
from magpie_hub.dataset.schema import BUILD_FEATURES, build_features
from magpie_hub.dataset.shards import shard_count, write_config_shards
from magpie_hub.layout import MANIFEST
from magpie_hub.recipe.load import load_recipe

RECIPE = {
    "name": "test-build",
    "model": "tiny:llama3",
    "backend": "dummy",
    "backend_options": {"empty_rate": 0.08, "colon_rate": 0.08, "truncate_rate": 0.04, "error_rate": 0.04},
    "seed": 7,
    "instruction_sampling": [{"temperature": 1.0, "top_p": 1.0, "share": 2},
                             {"temperature": 1.2, "top_p": 0.995, "share": 1}],
    "max_new_tokens": {"instruction": 32, "response": 32},
    "concurrency": 8,
    "configs": {
        "single_turn": {"rows": 12},
        "multi_turn": {"rows": 6, "turns": 3},
        "math": {"rows": 5, "category": "math"},
        "mix": {"rows": 9, "categories": {"math": 1, "code": 2}},
    },
}


def write_recipe(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(RECIPE))
    for key, value in changes.items():
        data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rows_of(out: Path, config: str) -> list[dict]:
    return pq.read_table(out / config).to_pylist()


def snapshot(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_build_exact_rows_schema_manifest_and_determinism(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml")
    recipe = load_recipe(recipe_path)
    out = tmp_path / "ds"
    manifest = pipeline.build(recipe_path, out=out)

    for name, cfg in recipe.configs.items():
        ds = datasets.load_dataset(str(out), name, split="train")
        plan = recipe.plan(name)
        assert len(ds) == cfg.rows
        assert ds.features == build_features(cfg.turns)
        assert ds["uuid"] == [plan.uuid(i) for i in range(cfg.rows)]        # ordered by index, no gaps/dups
        for i, row in enumerate(ds):
            p = plan.row(i)
            assert row["turns"] == cfg.turns and len(row["messages"]) == 2 * cfg.turns
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"] * cfg.turns
            assert [c["from"] for c in row["conversations"]] == ["human", "gpt"] * cfg.turns
            assert row["instruction"] == row["messages"][0]["content"] and row["instruction"].strip()
            assert not row["instruction"].endswith(":")
            assert row["category"] == p.category
            assert row["gen_input_configs"]["temperature"] == p.mix.temperature
            assert row["gen_input_configs"]["seed"] == 7 and row["model"] == "tiny:llama3"
            if p.category:
                assert "<|start_header_id|>system<|end_header_id|>" in row["gen_input_configs"]["pre_query_template"]
        assert sorted((out / name).iterdir())[0].name == "train-00000-of-00001.parquet"

    mix = datasets.load_dataset(str(out), "mix", split="train")
    assert sorted(mix["category"]) == ["code"] * 6 + ["math"] * 3

    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest
    assert on_disk["recipe"]["name"] == "test-build" and len(on_disk["recipe_sha256"]) == 64
    assert on_disk["model"]["id"] == "tiny:llama3"
    assert on_disk["templates"]["pre_query"].startswith("<|begin_of_text|><|start_header_id|>user")
    assert "category:math" in on_disk["system_templates"] and "multi_turn" in on_disk["system_templates"]
    assert on_disk["versions"]["datasets"] == datasets.__version__
    assert on_disk["totals"]["rows"] == 32
    assert sum(on_disk["totals"]["dropped"].values()) > 0         # faults were injected and regenerated
    for name, entry in on_disk["configs"].items():
        assert entry["rows"] == recipe.configs[name].rows and entry["generated_tokens"] > 0
        assert entry["generated_rows"] == entry["rows"] and entry["device_hours"] >= 0
    assert on_disk["configs"]["mix"]["categories"]["code"]["rows"] == 6
    assert (out / "README.md").is_file()
    assert not list((out / ".magpie" / "build").glob("*/rows-*.jsonl"))  # pieces merged away

    # the same command again: nothing to do, nothing rewritten
    before = snapshot(out)
    pipeline.build(recipe_path, out=out)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.endswith(".parquet")} == \
           {k: v for k, v in before.items() if k.endswith(".parquet")}

    # same recipe + seed in another dir (config by config): identical rows
    out2 = tmp_path / "ds2"
    for name in ("mix", "multi_turn"):
        pipeline.build(recipe_path, out=out2, configs=[name])
    for name in ("mix", "multi_turn"):
        assert rows_of(out2, name) == rows_of(out, name)
    assert sorted(json.loads((out2 / MANIFEST).read_text())["configs"]) == ["mix", "multi_turn"]


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``magpie-hub ARGS`` in this process; (exit code, stderr)."""
    from magpie_hub.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_changed_recipe_refused_then_fresh(tmp_path, capsys):
    recipe_path = write_recipe(tmp_path / "r.yaml", configs={"single_turn": {"rows": 5}})
    out = tmp_path / "ds"
    assert cli(capsys, "build", str(recipe_path), "--out", str(out))[0] == 0
    first = rows_of(out, "single_turn")
    before = snapshot(out)

    write_recipe(recipe_path, seed=8, configs={"single_turn": {"rows": 5}})
    code, err = cli(capsys, "build", str(recipe_path), "--out", str(out))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "different recipe" in err and "seed" in err and "--fresh" in err
    assert snapshot(out) == before

    code, err = cli(capsys, "build", str(recipe_path), "--out", str(out), "--rows", "6")
    assert code == 2 and "rows" in err and snapshot(out) == before

    assert cli(capsys, "build", str(recipe_path), "--out", str(out), "--fresh")[0] == 0
    fresh = rows_of(out, "single_turn")
    assert len(fresh) == 5 and {r["uuid"] for r in fresh}.isdisjoint({r["uuid"] for r in first})
    assert json.loads((out / MANIFEST).read_text())["recipe"]["seed"] == 8


def _complete_lines(out: Path) -> int:
    total = 0
    for piece in (out / ".magpie" / "build").glob("*/rows-*.jsonl"):
        total += piece.read_bytes().count(b"\n")
    return total


def test_kill_9_then_resume_gives_exact_rows(tmp_path):
    configs = {"single_turn": {"rows": 30}, "multi_turn": {"rows": 8, "turns": 2}}
    slow = {**RECIPE["backend_options"], "delay_ms": 40}
    recipe_path = write_recipe(tmp_path / "r.yaml", configs=configs, backend_options=slow, concurrency=2)
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "magpie_hub.cli", "build", str(recipe_path), "--out", str(out)]
    for threshold in (3, 16):          # kill twice: once early, once later in the resumed run
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while _complete_lines(out) < threshold and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, "the build finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert not (out / "multi_turn").exists()
    # simulate a write torn by the kill: a partial last line in a piece
    piece = sorted((out / ".magpie" / "build" / "single_turn").glob("rows-*.jsonl"))[0]
    with open(piece, "ab") as fh:
        fh.write(b'{"i": 3, "u": "torn')
    pipeline.build(recipe_path, out=out)

    reference = tmp_path / "ref"
    pipeline.build(write_recipe(tmp_path / "ref.yaml", configs=configs), out=reference)
    for name, cfg in configs.items():
        rows = rows_of(out, name)
        assert len(rows) == cfg["rows"] and len({r["uuid"] for r in rows}) == cfg["rows"]
        assert rows == rows_of(reference, name)            # no gaps, no duplicates, same content
    entry = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]
    assert entry["generated_rows"] >= 30                  # summed over the killed runs and the resume


def test_torchrun_two_processes_exact_rows(tmp_path):
    configs = {"single_turn": {"rows": 11}, "multi_turn": {"rows": 5, "turns": 2}}
    recipe_path = write_recipe(tmp_path / "r.yaml", configs=configs)
    out = tmp_path / "dp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = cli_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "magpie_hub.cli", "build",
                           str(recipe_path), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "ref"
    pipeline.build(recipe_path, out=reference)
    manifest = json.loads((out / MANIFEST).read_text())
    for name, cfg in configs.items():
        rows = rows_of(out, name)
        assert len(rows) == cfg["rows"] and len({r["uuid"] for r in rows}) == cfg["rows"]
        assert rows == rows_of(reference, name)
        entry = manifest["configs"][name]
        assert entry["processes"] == 2
        by_rank = entry["generated_rows_by_rank"]
        assert set(by_rank) == {"0", "1"} and all(n > 0 for n in by_rank.values())
        assert sum(by_rank.values()) == cfg["rows"]
    assert manifest["device"]["processes"] == 2


def test_hf_builder_gives_the_cli_rows(tmp_path):
    from magpie_hub.build.hf_builder import MagpieBuilder

    recipe_path = write_recipe(tmp_path / "r.yaml")
    out = tmp_path / "ds"
    pipeline.build(recipe_path, out=out, configs=["mix"])
    builder = MagpieBuilder(recipe=str(recipe_path), config_name="mix", cache_dir=str(tmp_path / "hf_cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset("train")
    assert ds.features == BUILD_FEATURES
    assert ds.to_list() == rows_of(out, "mix")
    with pytest.raises(Exception, match="unknown config"):
        MagpieBuilder(recipe=str(recipe_path), config_name="nope", cache_dir=str(tmp_path / "hf_cache"))


def test_shards_and_torn_checkpoint_lines(tmp_path):
    rows = [{"uuid": f"u{i}", "model": "m", "gen_input_configs": {"temperature": 1.0, "top_p": 1.0, "seed": 0,
             "pre_query_template": "p", "input_generator": "m"}, "instruction": f"q{i}", "response": f"a{i}",
             "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
             "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "turns": 1, "category": None} for i in range(10)]
    out = tmp_path / "d"
    paths = write_config_shards(out, "cfg", iter(rows), 10, shards=3)
    assert [p.name for p in paths] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert pq.read_table(out / "cfg").column("uuid").to_pylist() == [f"u{i}" for i in range(10)]
    assert not (out / ".magpie").exists()                        # no staging leftovers, no empty .magpie/
    with pytest.raises(RuntimeError):
        write_config_shards(out, "cfg", iter(rows[:9]), 10, shards=2)
    assert len(list((out / "cfg").glob("*.parquet"))) == 3          # the failed write left the old shards
    assert shard_count(10, 0) == 1 and shard_count(1000, 3 * 256 * 1024 * 1024) == 3

    ckpt = Checkpoint(out, "cfg")
    writer = PieceWriter(ckpt, rank=0, world=1, backend="dummy")
    for i in (0, 1, 2):
        writer.write(i, f"u{i}", rows[i])
    writer.write(1, "u1", rows[1])                   # a duplicate index: first wins
    writer.close()
    with open(writer.path, "ab") as fh:
        fh.write(b'{"i": 4, "u": "u4", "r": {"uu')     # torn tail
    scan = ckpt.scan(10, lambda i: f"u{i}")
    assert sorted(scan.locations) == [0, 1, 2] and scan.duplicates == 1
    assert ckpt.scan(10, lambda i: f"other{i}").stale == 4
    assert ckpt.stats()[0]["rows"] == 4


def test_exhausted_rows_fail_clearly_then_resume_with_more_replacements(tmp_path, capsys):
    faulty = {"colon_rate": 0.5}
    configs = {"single_turn": {"rows": 10}}
    recipe_path = write_recipe(tmp_path / "r.yaml", configs=configs, backend_options=faulty, max_attempts=1,
                               max_replacements=0)
    out = tmp_path / "ds"
    code, err = cli(capsys, "build", str(recipe_path), "--out", str(out))
    assert code == 2 and "rows failed 1 attempts" in err and "max_replacements" in err
    assert not (out / "single_turn").exists()
    kept = Checkpoint(out, "single_turn").scan(10, load_recipe(recipe_path).plan("single_turn").uuid)
    assert 0 < len(kept.locations) < 10 and kept.exhausted and set(kept.exhausted.values()) == {0}
    # raising max_replacements is not a changed recipe: the same rows, and the build resumes to exactly 10
    write_recipe(recipe_path, configs=configs, backend_options=faulty, max_attempts=1, max_replacements=40)
    assert cli(capsys, "build", str(recipe_path), "--out", str(out))[0] == 0
    rows = rows_of(out, "single_turn")
    assert len(rows) == 10 and len({r["uuid"] for r in rows}) == 10
    entry = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]
    assert entry["dropped"]["colon"] >= 1 and entry["generated_rows"] == 10
    assert entry["replaced"] == 10 - len(kept.locations)
    reference = tmp_path / "ref"                         # one uninterrupted run gives the same rows
    pipeline.build(recipe_path, out=reference)
    assert rows_of(reference, "single_turn") == rows
