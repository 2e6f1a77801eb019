"""``magpie-hub build --ray local --ray-workers 2``: the rank shares as Ray tasks on a local Ray instance (2
CPUs), one worker process killed mid-run (Ray retries its task, which resumes from the checkpoint): exactly N
rows, merged once; the recipe is test_multinode's, whose torchrun build gives the one-process rows, and
so does this one (same row set through Ray and through torchrun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env
from test_multinode import RECIPE, ROWS, one_process_rows, written  # noqa: F401 - the fixture is shared

from magpie_hub.build.ray_run import workers_file
from magpie_hub.layout import MANIFEST

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_ray_two_workers_one_killed_gives_the_one_process_rows(tmp_path, one_process_rows):  # noqa: F811
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out = tmp_path / "ray-out"
    proc = subprocess.Popen([sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out", str(out),
                             "--ray", "local", "--ray-workers", "2"], env=cli_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while written(out) < 0.3 * ROWS or not workers_file(out, 1).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.1)
        victim = json.loads(workers_file(out, 1).read_text())["pid"]
        os.kill(victim, signal.SIGKILL)                  # a Ray worker process, mid-share
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    assert json.loads(workers_file(out, 1).read_text())["pid"] != victim        # the retried task's process
    rows = pq.read_table(out / "single_turn").to_pylist()
    assert len(rows) == ROWS == len({r["uuid"] for r in rows})
    assert rows == one_process_rows
    by_rank = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]["generated_rows_by_rank"]
    assert set(by_rank) == {"0", "1"} and sum(by_rank.values()) >= ROWS
