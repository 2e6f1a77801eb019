"""The endpoint pool of the server backends against several TGI stand-ins: endpoint lists, the same-model
check, weighted least-outstanding routing, failover with re-probe and rejoin (in process), and a
``magpie-hub build`` over 3 servers with one killed at ~30% of the run (exactly N rows, no duplicates, the
same rows as through one server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import cli_env
from tgi_server import launched, launched_many

from magpie_hub import pipeline
from magpie_hub.errors import BackendError, RecipeError
from magpie_hub.generate.backends.base import GenerationRequest, SamplingParams
from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend
from magpie_hub.generate.backends.http.pool import parse_endpoints
from magpie_hub.generate.backends.http.tgi import TGIBackend
from magpie_hub.layout import MANIFEST

pytestmark = pytest.mark.slow
PROMPT = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
FAST = {"backoff_base": 0.01, "backoff_cap": 0.05, "probe_base": 0.2, "probe_cap": 0.5}


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline mode (set by conftest) blocks even 127.0.0.1: lift it in process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def req(seed: int) -> GenerationRequest:
    return GenerationRequest(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=24, seed=seed),
                             stop=("<|eot_id|>",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_lists_from_options_strings_files_and_env(tmp_path, monkeypatch):
    listed = tmp_path / "endpoints.txt"
    listed.write_text("# replicas\nhttp://a:8080\nhttp://b:8080/  # second\n\nhttp://a:8080\n")
    assert parse_endpoints(str(listed)) == ["http://a:8080", "http://b:8080"]
    assert parse_endpoints("http://a:1, http://b:2 http://c:3") == ["http://a:1", "http://b:2", "http://c:3"]
    assert parse_endpoints(["http://a:1"]) == ["http://a:1"]
    with pytest.raises(RecipeError, match="not an http"):
        parse_endpoints(["ftp://a:1"])
    with pytest.raises(RecipeError, match="neither a file"):
        parse_endpoints("no-such-file.txt")
    backend = TGIBackend("tiny:llama3", endpoint="http://x:1,http://y:2")
    assert [m.url for m in backend.pool.members] == ["http://x:1", "http://y:2"]
    monkeypatch.setenv("MAGPIE_OPENAI_ENDPOINTS", "http://u:8000/v1 http://v:8000/v1")
    backend = OpenAICompletionsBackend("tiny:llama3")
    assert [m.url for m in backend.pool.members] == ["http://u:8000", "http://v:8000"]
    assert TGIBackend("tiny:llama3", endpoint="http://x:1").pool is None


def test_every_endpoint_must_serve_the_same_model(tiny_llama3, online):
    with launched_many(tiny_llama3, 2, "--simulate") as same, \
            launched(tiny_llama3, "--simulate", "--model-id", "other/model") as (odd, _):
        urls = [same[0][0], odd, same[1][0]]
        with pytest.raises(BackendError) as err:
            asyncio.run(TGIBackend(str(tiny_llama3), endpoints=urls, check_model=False).start())
    message = str(err.value)
    assert "\n" not in message and f"but {odd} serves 'other/model'" in message, message


def test_weighted_routing_failover_reprobe_and_rejoin(tiny_llama3, online):
    """Capacities 2 and 6: traffic follows them; B killed mid-batch: all requests succeed on A; B restarted
    on its port: re-probed, rejoins and serves again."""
    port_b = free_port()
    sim = ("--simulate", "--ms-per-token", "5", "--mean-tokens", "10", "--slots", "8")
    with launched(tiny_llama3, *sim, "--max-concurrent-requests", "2") as (url_a, _):
        b = launched(tiny_llama3, *sim, "--max-concurrent-requests", "6", "--port", str(port_b))
        url_b, proc_b = b.__enter__()
        backend = TGIBackend(str(tiny_llama3), endpoints=[url_a, url_b], **FAST)

        async def scenario():
            async with backend:
                assert backend.max_concurrency == 8
                first = await asyncio.gather(*(backend.generate(req(i)) for i in range(40)))
                load = {s["url"]: s["ok"] for s in backend.pool_status()}
                assert load[url_b] > 2 * load[url_a] > 0, load
                batch = [asyncio.ensure_future(backend.generate(req(100 + i))) for i in range(60)]
                while backend.pool_status()[1]["ok"] < load[url_b] + 5:
                    await asyncio.sleep(0.01)
                os.kill(proc_b.pid, signal.SIGKILL)
                second = await asyncio.gather(*batch)
                status = {s["url"]: s for s in backend.pool_status()}
                assert status[url_b]["state"] == "down" and status[url_b]["taken_out"] == 1
                assert status[url_b]["resent"] >= 1                # its in-flight requests went to A
                with launched(tiny_llama3, *sim, "--max-concurrent-requests", "6", "--port", str(port_b)):
                    deadline = time.monotonic() + 20
                    while backend.pool_status()[1]["state"] != "up" and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    ok_before = backend.pool_status()[1]["ok"]
                    third = await asyncio.gather(*(backend.generate(req(200 + i)) for i in range(30)))
                    assert backend.pool_status()[1]["ok"] > ok_before        # B serves again
                return first + second + third, backend.info()

        try:
            results, info = asyncio.run(scenario())
        finally:
            b.__exit__(None, None, None)
    assert all(r.finish_reason != "error" and r.error is None for r in results)
    assert info.extra["endpoint"] == [url_a, url_b] and len(info.extra["pool"]) == 2


def test_openai_pool_spreads_requests_over_its_endpoints(tiny_llama3, online):
    with launched_many(tiny_llama3, 2, "--simulate", "--ms-per-token", "2", "--model-id", "served-llama") as servers:
        urls = [u + "/v1" for u, _ in servers]
        backend = OpenAICompletionsBackend(str(tiny_llama3), endpoints=urls, served_model="served-llama",
                                           check_model=False, max_concurrency=4, **FAST)

        async def run():
            async with backend:
                assert backend.max_concurrency == 8                  # 4 per endpoint (vLLM reports none)
                return await asyncio.gather(*(backend.generate(req(i)) for i in range(24)))

        results = asyncio.run(run())
    assert all(r.finish_reason != "error" for r in results)
    assert all(s["ok"] > 0 and s["tokens"] > 0 for s in backend.pool_status())


RECIPE = """name: pool
model: {model}
backend: tgi
backend_options: {options}
seed: 5
instruction_sampling: [{{temperature: 1.0, top_p: 1.0}}]
response_sampling: {{temperature: 0.0}}
max_new_tokens: {{instruction: 32, response: 32}}
max_attempts: 40
configs:
  single_turn: {{rows: {rows}}}
"""


def test_build_over_three_servers_one_killed_at_30_percent(tiny_llama3, tmp_path, online):
    rows = 90
    sim = ("--simulate", "--ms-per-token", "3", "--mean-tokens", "12", "--slots", "6",
           "--max-concurrent-requests", "6")
    with launched_many(tiny_llama3, 3, *sim) as servers:
        urls = [u for u, _ in servers]
        opts = {"endpoints": urls, "timeout": 60, **FAST}   # a loaded CI box must not time requests out
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE.format(model=tiny_llama3, options=json.dumps(opts), rows=rows))
        out = tmp_path / "out"
        pieces = out / ".magpie" / "build" / "single_turn"
        proc = subprocess.Popen([sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out", str(out)],
                                env=cli_env(online=True), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while sum(p.read_bytes().count(b"\n") for p in pieces.glob("rows-*.jsonl")) < 0.3 * rows:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
            os.kill(servers[1][1].pid, signal.SIGKILL)
            _, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"{urls[1]} taken out" in stderr
        one = tmp_path / "one.yaml"
        one.write_text(RECIPE.format(model=tiny_llama3, options=json.dumps({"endpoint": urls[0], **FAST}), rows=rows))
        pipeline.build(one, out=tmp_path / "ref")             # in process: no second CLI start-up
    got = pq.read_table(out / "single_turn").to_pylist()
    assert len(got) == rows == len({r["uuid"] for r in got})
    ref_rows = pq.read_table(tmp_path / "ref" / "single_turn").to_pylist()
    assert got == ref_rows, _debug_diff(got, ref_rows)   # same rows as through one server
    pool = {s["url"]: s for s in json.loads((out / MANIFEST).read_text())["backend"]["info"]["endpoints"]}
    assert pool[urls[1]]["state"] == "down" and pool[urls[1]]["taken_out"] >= 1
    assert all(pool[u]["ok"] > 0 and pool[u]["tokens"] > 0 for u in urls)
    assert Path(pieces).exists() is False or not list(pieces.glob("rows-*.jsonl"))


def _debug_diff(a, b):
    for x, y in zip(a, b, strict=True):
        if x != y:
            return {k: (x[k], y[k]) for k in x if x[k] != y.get(k)}
