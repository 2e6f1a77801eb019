"""Multi-node data parallelism with torchrun: two "nodes" on this machine (``--nnodes 2``, c10d rendezvous on
127.0.0.1) build into one shared directory; one node is killed mid-run (its agent and worker, ``kill -9``),
the survivor fails at the next collective, and the job is resubmitted (both nodes relaunched, as a Slurm
requeue does): exactly N rows, merged once, the same rows as a one-process build."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env

from magpie_hub import pipeline
from magpie_hub.layout import MANIFEST

pytestmark = pytest.mark.slow
ROWS = 36
RECIPE = {
    "name": "multinode", "model": "tiny:llama3", "backend": "dummy",
    "backend_options": {"delay_ms": 150, "error_rate": 0.05, "empty_rate": 0.05},
    "seed": 11, "max_new_tokens": {"instruction": 24, "response": 24}, "concurrency": 2,
    "configs": {"single_turn": {"rows": ROWS}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(rank: int, port: int, recipe: Path, out: Path, log: Path) -> subprocess.Popen:
    """One torchrun "node": its agent, which starts the worker."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    with open(log, "a") as fh:
        return subprocess.Popen(
            [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"magpie-{port}",
             "--rdzv-conf", "join_timeout=90,last_call_timeout=1", "--monitor-interval", "0.5",
             "-m", "magpie_hub.cli", "build", str(recipe), "--out", str(out)],
            env=cli_env(OMP_NUM_THREADS="1"), stdout=fh, stderr=subprocess.STDOUT)


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: the agent and every process under it (torchrun's workers have their own session)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(10)


def written(out: Path) -> int:
    pieces = (out / ".magpie" / "build" / "single_turn").glob("rows-*.jsonl")
    return sum(b'"r":' in line for p in pieces for line in p.read_bytes().splitlines())


@pytest.fixture(scope="session")
def one_process_rows(tmp_path_factory) -> list[dict]:
    """The rows of RECIPE built by one plain process (tests/test_ray.py compares with them too)."""
    recipe = tmp_path_factory.mktemp("one") / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    pipeline.build(recipe, out=recipe.parent / "one")
    return pq.read_table(recipe.parent / "one" / "single_turn").to_pylist()


def test_two_nodes_one_killed_and_relaunched_gives_the_one_process_rows(tmp_path, one_process_rows):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    out, log, port = tmp_path / "shared", tmp_path / "nodes.log", free_port()
    node0 = node(0, port, recipe, out, log)
    time.sleep(1.0)                                   # node 0 hosts the rendezvous store
    node1 = node(1, port, recipe, out, log)
    procs = [node0, node1]
    try:
        deadline = time.monotonic() + 150
        while written(out) < 0.3 * ROWS:
            assert node0.poll() is None and node1.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        assert node0.poll() is None and node1.poll() is None, log.read_text()[-4000:]
        kill_node(node1)
        assert written(out) < ROWS
        node0.wait(120)                               # its share done, it fails at the barrier: peer gone
        assert not (out / "single_turn").exists()
        port = free_port()                            # the job resubmitted: both nodes again
        procs += [node(0, port, recipe, out, log)]
        time.sleep(1.0)
        procs += [node(1, port, recipe, out, log)]
        assert procs[2].wait(180) == 0 and procs[3].wait(60) == 0, log.read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_node(p)
    rows = pq.read_table(out / "single_turn").to_pylist()
    assert len(rows) == ROWS == len({r["uuid"] for r in rows})
    assert rows == one_process_rows
    entry = json.loads((out / MANIFEST).read_text())["configs"]["single_turn"]
    assert entry["processes"] == 2 and sum(entry["generated_rows_by_rank"].values()) >= ROWS
    assert not list((out / ".magpie" / "build" / "single_turn").glob("rows-*.jsonl"))   # merged once, pieces gone
