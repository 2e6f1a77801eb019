"""The tgi backend against the TGI stand-in: server checks, request parameters, BOS, retries and
fail-fast errors (in process), and ``magpie-hub build --backend tgi`` end to end (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from tgi_server import launched

from magpie_hub.errors import BackendError, RecipeError
from magpie_hub.generate.backends.base import GenerationRequest, SamplingParams
from magpie_hub.generate.backends.http.tgi import TGIBackend

pytestmark = pytest.mark.slow
BOS = "<|begin_of_text|>"
PROMPT = BOS + "<|start_header_id|>user<|end_header_id|>\n\n"
FAST = {"backoff_base": 0.01, "backoff_cap": 0.05}


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline mode (set by conftest) blocks even 127.0.0.1: lift it in process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="session")
def bos_model(tiny_llama3, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that adds BOS itself (like real Llama-3: TGI would double it)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("bos") / "tiny-bos"
    shutil.copytree(tiny_llama3, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.bos_token_id)])
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("hi").input_ids[0] == tok.bos_token_id
    return out


def req(prompt=PROMPT, *, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=1, stop=("<|eot_id|>",)):
    return GenerationRequest(prompt, SamplingParams(temperature=temperature, top_p=top_p,
                                                    max_new_tokens=max_new_tokens, seed=seed), stop=stop)


async def _generate_all(backend, requests):
    async with backend:
        return await asyncio.gather(*(backend.generate(r) for r in requests))


def logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return {k: float(v) for k, v in (line.split() for line in resp.read().decode().splitlines())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- backend
def test_server_info_bos_strip_and_valid_parameters(bos_model, tmp_path, online):
    log = tmp_path / "req.jsonl"
    with launched(bos_model, "--simulate", "--ms-per-token", "0", "--max-concurrent-requests", "7",
                  "--log-requests", str(log)) as (url, _):
        backend = TGIBackend(str(bos_model), endpoint=url, **FAST)
        stops = ("<|eot_id|>", "A", "B", "C", "how")
        results = asyncio.run(_generate_all(backend, [
            req(temperature=1.0, top_p=1.0, seed=5, stop=stops), req(temperature=0.0, seed=9),
            req(temperature=0.7, top_p=0.9, seed=2**64 + 3)]))
        assert backend.max_concurrency == 7 and backend.strip_prefix == BOS
        assert asyncio.run(_start_limit(TGIBackend(str(bos_model), endpoint=url, max_concurrency=3))) == 3
    by_seed = {entry["body"]["parameters"].get("seed"): entry["body"] for entry in logged(log)}
    # the requests run concurrently: identify them by seed (greedy sends none), not by arrival order
    sampled, greedy, nucleus = by_seed[5], by_seed[None], by_seed[3]
    assert all(not e["body"]["inputs"].startswith(BOS) for e in logged(log))
    first_ids = logged(log)[0]["input_ids"]
    assert first_ids.count(first_ids[0]) == 1  # exactly one BOS reached the model
    p = sampled["parameters"]
    assert p["details"] is True and p["return_full_text"] is False and "top_p" not in p
    assert p["do_sample"] is True and p["temperature"] == 1.0 and p["seed"] == 5 and p["stop"] == list(stops[:4])
    assert greedy["parameters"]["do_sample"] is False and "temperature" not in greedy["parameters"]
    assert "seed" not in greedy["parameters"]
    assert nucleus["parameters"]["top_p"] == 0.9 and nucleus["parameters"]["seed"] == 3
    for r in results:
        assert r.finish_reason in ("stop", "length") and r.generated_tokens >= 1 and r.error is None
    assert "how" not in results[0].text  # the 5th stop string is applied locally
    info = backend.info()
    assert info.name == "tgi" and info.extra["endpoint"] == url and info.extra["strip_bos"] is True


async def _start_limit(backend):
    async with backend:
        return backend.max_concurrency


def test_no_strip_when_the_server_does_not_add_bos(tiny_llama3, tmp_path, online):
    log = tmp_path / "req.jsonl"
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--log-requests", str(log)) as (url, _):
        backend = TGIBackend(str(tiny_llama3), endpoint=url)
        (result,) = asyncio.run(_generate_all(backend, [req()]))
    assert backend.strip_prefix is None and logged(log)[0]["body"]["inputs"] == PROMPT
    assert result.finish_reason in ("stop", "length")


def test_stop_sequences_end_the_text(tiny_llama3, online):
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--mean-tokens", "30") as (url, _):
        plain = asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url),
                                          [req(seed=s, max_new_tokens=60) for s in range(10)]))
        word = " " + plain[0].text.split()[1] if len(plain[0].text.split()) > 1 else " the"
        cut = asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url),
                                        [req(seed=s, max_new_tokens=60, stop=(word,)) for s in range(10)]))
    hits = 0
    for full, short in zip(plain, cut, strict=True):
        if word in full.text:
            hits += 1
            assert short.finish_reason == "stop" and short.text == full.text[: full.text.index(word)]
        else:
            assert short == full
    assert hits >= 1


def test_model_mismatch_and_check_model_false(tiny_llama3, online):
    with launched(tiny_llama3, "--simulate", "--model-id", "meta-llama/Meta-Llama-3-70B-Instruct") as (url, _):
        with pytest.raises(BackendError, match="model mismatch.*Meta-Llama-3-70B-Instruct.*check_model: false"):
            asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url), []))
        asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url, check_model=False), [req()]))


def test_bad_endpoints_fail_fast_with_one_line(tiny_llama3, online, monkeypatch):
    with pytest.raises(RecipeError, match="MAGPIE_TGI_ENDPOINT"):
        TGIBackend("m")
    with pytest.raises(RecipeError, match="not an http"):
        TGIBackend("m", endpoint="localhost:8080")
    started = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach the TGI server") as err:
        asyncio.run(_generate_all(TGIBackend("m", endpoint=f"http://127.0.0.1:{free_port()}"), []))
    assert time.monotonic() - started < 15 and "\n" not in str(err.value)
    with launched(tiny_llama3, "--simulate") as (url, _):
        with pytest.raises(BackendError, match="not a TGI server"):
            asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url + "/v1"), []))
        monkeypatch.setenv("MAGPIE_TGI_ENDPOINT", url)
        (result,) = asyncio.run(_generate_all(TGIBackend(str(tiny_llama3)), [req()]))
        assert result.finish_reason != "error"


def test_token_from_env_and_dotenv_401_is_fatal(tiny_llama3, online, monkeypatch, tmp_path):
    secret, wrong = "hf_standinSecret123456", "hf_wrongTokenValue98765"
    with launched(tiny_llama3, "--simulate", "--token", secret) as (url, _):
        monkeypatch.setenv("HF_TOKEN", wrong)
        with pytest.raises(BackendError, match="HTTP 401.*HF_TOKEN") as err:
            asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url), []))
        assert wrong not in str(err.value) and secret not in str(err.value)
        monkeypatch.delenv("HF_TOKEN")
        (tmp_path / ".env").write_text(f"HF_TOKEN={secret}\n")  # tests run in tmp_path
        (ok,) = asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint=url), [req()]))
        assert ok.finish_reason != "error"


def test_transient_faults_are_retried_until_success(tiny_llama3, online):
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "1", "--fail-503", "0.15", "--fail-429", "0.1",
                  "--drop", "0.1", "--stall", "0.1", "--stall-s", "2") as (url, _):
        backend = TGIBackend(str(tiny_llama3), endpoint=url, timeout=0.5, max_retries=25, **FAST)
        results = asyncio.run(_generate_all(backend, [req(seed=s) for s in range(40)]))
        m = metrics(url)
    assert all(r.finish_reason in ("stop", "length") for r in results)
    kinds = {k.split(":", 1)[1].split()[0] for k in backend.stats if k.startswith("retry:")}
    assert {"HTTP", "timeout", "connection"} <= kinds
    assert m["tgi_standin_faults_503"] > 0 and m["tgi_standin_drops"] > 0 and m["tgi_standin_stalls"] > 0
    assert backend.stats["requests_ok"] == 40


def test_exhausted_retries_return_error_results(tiny_llama3, online):
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--fail-503", "0.6") as (url, _):
        backend = TGIBackend(str(tiny_llama3), endpoint=url, max_retries=1, **FAST)
        results = asyncio.run(_generate_all(backend, [req(seed=s) for s in range(30)]))
    errors = [r for r in results if r.finish_reason == "error"]
    assert errors and len(errors) < 30
    assert all(r.text == "" and r.generated_tokens == 0 and "HTTP 503" in r.error for r in errors)


def test_validation_422_is_fatal_and_prompts_must_fit(tiny_llama3, online):
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--max-input-tokens", "40",
                  "--max-total-tokens", "56") as (url, _):
        long_prompt = PROMPT + "word " * 40

        async def scenario():
            async with TGIBackend(str(tiny_llama3), endpoint=url) as first:
                with pytest.raises(BackendError, match="does not fit the TGI server"):
                    await first.generate(req(long_prompt))  # nothing succeeded yet: the run stops
                with pytest.raises(asyncio.TimeoutError):  # after a fatal error, other requests wait to be cancelled
                    await asyncio.wait_for(first.generate(req()), 0.5)
            backend = TGIBackend(str(tiny_llama3), endpoint=url)
            async with backend:
                clamped = await backend.generate(req(max_new_tokens=500))  # clamped to max_total_tokens
                later = await backend.generate(req(long_prompt))          # this conversation outgrew the server
                backend.server["max_stop_sequences"] = 5
                with pytest.raises(BackendError, match=r"rejected a request \(HTTP 422\).*4 stop sequences"):
                    await backend.generate(req(stop=("a", "b", "c", "d", "e")))
                return clamped, later

        clamped, later = asyncio.run(scenario())
    assert clamped.finish_reason in ("stop", "length") and clamped.generated_tokens <= 56
    assert later.finish_reason == "length" and "does not fit" in later.error


def test_a_vanished_server_stops_the_run(tiny_llama3, online):
    async def scenario(url, proc):
        backend = TGIBackend(str(tiny_llama3), endpoint=url, max_retries=2, **FAST)
        async with backend:
            await backend.generate(req())
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            with pytest.raises(BackendError, match="lost the TGI server.*connection refused"):
                await backend.generate(req())

    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0") as (url, proc):
        asyncio.run(scenario(url, proc))


def test_offline_mode_is_explained(tiny_llama3):
    with pytest.raises(BackendError, match="unset HF_HUB_OFFLINE"):
        asyncio.run(_generate_all(TGIBackend(str(tiny_llama3), endpoint="http://127.0.0.1:9"), []))


# ---------------------------------------------------------------------------------------------- CLI
def write_recipe(path: Path, model: Path, configs: str, response_temperature: float = 0.0, **options) -> Path:
    opts = {"timeout": 1.5, "backoff_base": 0.02, "backoff_cap": 0.2, **options}
    path.write_text(f"""name: tgi-cli
model: {model}
backend: tgi
backend_options: {json.dumps(opts)}
seed: 3
instruction_sampling:
  - {{temperature: 1.0, top_p: 1.0, share: 0.5}}
  - {{temperature: 1.1, top_p: 0.995, share: 0.5}}
response_sampling: {{temperature: {response_temperature}}}
max_new_tokens: {{instruction: 48, response: 64}}
max_attempts: 40
concurrency: 32
configs:
{configs}""")
    return path


def load_rows(out: Path, config: str) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((out / config).glob("*.parquet"))
    assert files, f"no shards in {out / config}"
    return [row for f in files for row in pq.read_table(f).to_pylist()]


SIM = ("--simulate", "--ms-per-token", "1", "--mean-tokens", "14", "--slots", "16")
CONFIGS = """  single_turn: {rows: 12}
  multi_turn: {rows: 6, turns: 3}
  math: {rows: 6, category: math}
"""


def test_cli_build_single_multi_category_with_and_without_faults(tiny_llama3, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, CONFIGS)
    log = tmp_path / "req.jsonl"
    with launched(tiny_llama3, *SIM, "--log-requests", str(log)) as (url, _):
        proc = run_cli("build", str(recipe), "--out", str(tmp_path / "clean"), "--backend", "tgi",
                       "--endpoint", url, env=cli_env(online=True))
        assert proc.returncode == 0, proc.stderr
    faults = ("--fail-503", "0.03", "--fail-429", "0.03", "--drop", "0.02", "--stall", "0.02", "--stall-s", "3")
    with launched(tiny_llama3, *SIM, *faults, "--fault-seed", "11") as (url, _):
        proc = run_cli("build", str(recipe), "--out", str(tmp_path / "faulty"), "--endpoint", url,
                       env=cli_env(online=True))
        assert proc.returncode == 0, proc.stderr
        m = metrics(url)
    assert m["tgi_standin_faults_503"] + m["tgi_standin_faults_429"] + m["tgi_standin_drops"] \
        + m["tgi_standin_stalls"] >= 3
    for name, rows, turns in (("single_turn", 12, 1), ("multi_turn", 6, 3), ("math", 6, 1)):
        clean, faulty = load_rows(tmp_path / "clean", name), load_rows(tmp_path / "faulty", name)
        assert len(clean) == rows == len({r["uuid"] for r in clean})
        assert len(faulty) == rows == len({r["uuid"] for r in faulty})
        assert all(r["turns"] == turns and len(r["messages"]) == 2 * turns for r in clean)
        assert all(r["instruction"] and r["response"] for r in clean)
        if name == "math":
            assert {r["category"] for r in clean} == {"math"}
        # retried requests repeat the same seed: faults change nothing in the data
        assert sorted(clean, key=lambda r: r["uuid"]) == sorted(faulty, key=lambda r: r["uuid"])
    manifest = json.loads((tmp_path / "clean" / "magpie_manifest.json").read_text())
    assert manifest["backend"]["name"] == "tgi"
    for entry in logged(log):
        p = entry["body"]["parameters"]
        assert len(p.get("stop", [])) <= 4 and 0 < p.get("top_p", 0.5) < 1
        assert p["do_sample"] is ("temperature" in p)
        assert entry["body"]["inputs"].count(BOS) == 1  # this tokenizer adds no BOS: the template's stays


def test_cli_401_ends_the_run_with_one_line(tiny_llama3, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, CONFIGS)
    wrong = "hf_notTheRightToken4242"
    with launched(tiny_llama3, *SIM, "--token", "hf_serverSideSecret777") as (url, _):
        started = time.monotonic()
        proc = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--endpoint", url,
                       env=cli_env(online=True, HF_TOKEN=wrong), timeout=120)
        elapsed = time.monotonic() - started
        m = metrics(url)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "401" in lines[-1] and "HF_TOKEN" in lines[-1]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in proc.stderr
    assert wrong not in proc.stdout + proc.stderr and "hf_serverSideSecret777" not in proc.stdout + proc.stderr
    assert m["tgi_standin_requests"] == 0 and elapsed < 60
    assert not any((tmp_path / "out").glob("*/*.parquet"))


def test_cli_stops_within_seconds_when_the_server_dies(tiny_llama3, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, "  single_turn: {rows: 200}\n", max_retries=2)
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "20", "--slots", "4") as (url, server):
        proc = subprocess.Popen([sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out",
                                 str(tmp_path / "out"), "--endpoint", url], env=cli_env(online=True),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while metrics(url).get("tgi_standin_success", 0) < 10 and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(server.pid, signal.SIGKILL)
            killed = time.monotonic()
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2 and time.monotonic() - killed < 30, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: lost the TGI server at http://127.0.0.1:"), stderr
    assert "Traceback" not in stderr, stderr


def test_cli_kill9_and_resume_gives_exact_rows(tiny_llama3, tmp_path):
    configs = "  single_turn: {rows: 48}\n"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, configs)
    slow = ("--simulate", "--ms-per-token", "15", "--mean-tokens", "14", "--slots", "4")
    with launched(tiny_llama3, *slow) as (url, _):
        proc = subprocess.Popen([sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out",
                                 str(tmp_path / "out"), "--endpoint", url], env=cli_env(online=True),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while metrics(url).get("tgi_standin_success", 0) < 40 and time.monotonic() < deadline:
                assert proc.poll() is None, "the build ended before it could be killed"
                time.sleep(0.2)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert not (tmp_path / "out" / "single_turn").exists()
        before = metrics(url)["tgi_standin_success"]
        resumed = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--endpoint", url,
                          env=cli_env(online=True))
        assert resumed.returncode == 0, resumed.stderr
        resumed_requests = metrics(url)["tgi_standin_success"] - before
    with launched(tiny_llama3, *SIM) as (url, _):
        clean = run_cli("build", str(recipe), "--out", str(tmp_path / "clean"), "--endpoint", url,
                        env=cli_env(online=True))
        assert clean.returncode == 0, clean.stderr
        clean_requests = metrics(url)["tgi_standin_success"]
    rows = load_rows(tmp_path / "out", "single_turn")
    assert len(rows) == 48 == len({r["uuid"] for r in rows})
    assert resumed_requests < clean_requests  # the rows checkpointed before the kill were kept
    assert sorted(rows, key=lambda r: r["uuid"]) == sorted(load_rows(tmp_path / "clean", "single_turn"),
                                                           key=lambda r: r["uuid"])


def test_cli_build_through_the_model_backed_server(tiny_llama3, tmp_path):
    # sampled responses: greedy decoding of a random-weight model often ends the turn at once (empty)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, "  single_turn: {rows: 4}\n", response_temperature=1.0,
                          timeout=60)
    with launched(tiny_llama3) as (url, _):
        proc = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--endpoint", url,
                       env=cli_env(online=True))
        assert proc.returncode == 0, proc.stderr
        assert metrics(url)["tgi_standin_success"] >= 8
    rows = load_rows(tmp_path / "out", "single_turn")
    assert len(rows) == 4 == len({r["uuid"] for r in rows})


# ---------------------------------------------------------------------------------------------- openai
def test_openai_completions_backend(bos_model, tmp_path):
    from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend

    log = tmp_path / "req.jsonl"
    with launched(bos_model, "--simulate", "--ms-per-token", "0", "--log-requests", str(log)) as (url, _):
        backend = OpenAICompletionsBackend(str(bos_model), endpoint=url + "/v1", **FAST)
        stops = ("<|eot_id|>", "A", "B", "C", "how")
        results = asyncio.run(_generate_all(backend, [req(seed=4, stop=stops), req(temperature=0.0),
                                                      req(temperature=0.8, top_p=0.95)]))
    assert backend.served_model == str(bos_model) and backend.strip_prefix == BOS
    assert backend.max_concurrency == 64 and backend.info().name == "openai"
    probe, *sent = (e["body"] for e in logged(log))  # start() probes the route before any request
    # the three requests are concurrent: identify them by content, not by arrival order
    assert len(sent) == 3
    (sampled,) = (b for b in sent if b.get("seed") == 4)
    (greedy,) = (b for b in sent if b.get("temperature") == 0.0)
    (nucleus,) = (b for b in sent if b.get("top_p") == 0.95)
    assert probe["max_tokens"] == 1
    assert all(e["path"] == "/v1/completions" and not e["body"]["prompt"].startswith(BOS) for e in logged(log))
    assert sampled["model"] == str(bos_model) and sampled["seed"] == 4 and "top_p" not in sampled
    assert sampled["stop"] == list(stops[:4]) and sampled["max_tokens"] == 24
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and nucleus["top_p"] == 0.95
    assert all(r.finish_reason in ("stop", "length") and r.generated_tokens >= 1 for r in results)
    assert "how" not in results[0].text


def test_openai_chat_only_server_is_explained(tiny_llama3):
    from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend

    with launched(tiny_llama3, "--simulate", "--chat-only") as (url, _):
        with pytest.raises(BackendError, match="offers no raw text completion.*chat-only API cannot") as err:
            asyncio.run(_generate_all(OpenAICompletionsBackend(str(tiny_llama3), endpoint=url), []))
    assert "\n" not in str(err.value) and "vLLM" in str(err.value)


def test_openai_model_choice_and_api_key(tiny_llama3, monkeypatch):
    from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend

    with launched(tiny_llama3, "--simulate", "--model-id", "served-llama", "--token", "sk-local-key-123") as (url, _):
        monkeypatch.setenv("HF_TOKEN", "sk-local-key-123")  # a Hub token is never sent to such a server
        with pytest.raises(BackendError, match="HTTP 401.*OPENAI_API_KEY"):
            asyncio.run(_generate_all(OpenAICompletionsBackend(str(tiny_llama3), endpoint=url), []))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local-key-123")
        with pytest.raises(BackendError, match="model mismatch.*served-llama.*served_model"):
            asyncio.run(_generate_all(OpenAICompletionsBackend(str(tiny_llama3), endpoint=url), []))
        with pytest.raises(BackendError, match="model mismatch.*check_model: false"):
            asyncio.run(_generate_all(OpenAICompletionsBackend(str(tiny_llama3), endpoint=url,
                                                               served_model="served-llama"), []))
        backend = OpenAICompletionsBackend(str(tiny_llama3), endpoint=url, served_model="served-llama",
                                           check_model=False)
        (result,) = asyncio.run(_generate_all(backend, [req()]))
    assert result.finish_reason in ("stop", "length")


def test_cli_build_with_the_openai_backend(tiny_llama3, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama3, "  single_turn: {rows: 8}\n  multi_turn: {rows: 4, turns: 2}\n")
    with launched(tiny_llama3, *SIM, "--fail-503", "0.05") as (url, _):
        proc = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), "--backend", "openai",
                       "--endpoint", url)  # no huggingface_hub client: works under HF_HUB_OFFLINE=1
        assert proc.returncode == 0, proc.stderr
    for name, rows in (("single_turn", 8), ("multi_turn", 4)):
        got = load_rows(tmp_path / "out", name)
        assert len(got) == rows == len({r["uuid"] for r in got})
    assert json.loads((tmp_path / "out" / "magpie_manifest.json").read_text())["backend"]["name"] == "openai"


# ---------------------------------------------------------------------------------------------- helpers
def test_backoff_grows_with_jitter_and_honours_retry_after():
    import random

    from magpie_hub.retry import backoff_delay, parse_retry_after

    rng = random.Random(0)
    delays = [backoff_delay(a, base=0.5, cap=8.0, rng=rng) for a in range(6)]
    assert all(0.5 * min(8.0, 0.5 * 2**a) <= d <= min(8.0, 0.5 * 2**a) for a, d in enumerate(delays))
    assert len({round(backoff_delay(3, rng=rng), 6) for _ in range(5)}) == 5
    assert backoff_delay(0, base=0.1, cap=30, retry_after=7.0) == 7.0
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_one_retry_loop_for_sync_and_async_callers():
    from magpie_hub.retry import RetriesExhausted, RetryPolicy, Transient, retry_async, retry_sync

    def flaky(failures: int):
        calls = []

        def call():
            calls.append(1)
            if len(calls) <= failures:
                raise ConnectionError(f"drop {len(calls)}")
            return len(calls)
        return call, calls

    def classify(exc):
        if isinstance(exc, ConnectionError):
            return Transient(f"connection: {exc}", retry_after=0.0)
        raise exc

    policy = RetryPolicy(3, base=0.001, cap=0.002)
    seen = []
    call, calls = flaky(2)
    assert retry_sync(call, policy, classify, lambda f, a, d: seen.append((f.reason, a, d is None))) == 3
    assert seen == [("connection: drop 1", 0, False), ("connection: drop 2", 1, False)]
    call, calls = flaky(10)
    with pytest.raises(RetriesExhausted) as err:
        retry_sync(call, policy, classify)
    assert len(calls) == 4 and err.value.tries == 4 and err.value.failure.reason == "connection: drop 4"
    with pytest.raises(KeyError):                              # not transient: raised at once, no retry
        retry_sync(lambda: {}["x"], policy, classify)

    async def acall_of(call):
        async def acall():
            return call()
        return await retry_async(acall, policy, classify)

    call, calls = flaky(3)
    assert asyncio.run(acall_of(call)) == 4
