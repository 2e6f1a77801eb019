"""The TGI stand-in (tests/tgi_server.py) speaks TGI's protocol: shapes, validation, auth, overload,
injected faults, streaming, model-backed generation; and huggingface_hub's client parses it."""

from __future__ import annotations

import http.client
import json
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from tgi_server import launched

pytestmark = pytest.mark.slow


def call(url: str, path: str, body: dict | None = None, *, token: str | None = None, timeout: float = 30):
    """(status, parsed JSON or text) of one request; connection failures raise."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def gen_body(prompt: str = "Hello", **params) -> dict:
    return {"inputs": prompt, "parameters": {"details": True, "max_new_tokens": 32, **params}}


@pytest.fixture(scope="module")
def sim(tiny_llama3):
    with launched(tiny_llama3, "--simulate", "--slots", "4", "--ms-per-token", "1", "--mean-tokens", "12",
                  "--max-input-tokens", "64", "--max-total-tokens", "96", "--model-id", "org/tiny") as (url, _):
        yield url


def test_info_health_and_generate_shapes(sim):
    status, info = call(sim, "/info")
    assert status == 200 and info["model_id"] == "org/tiny"
    for key in ("max_concurrent_requests", "max_input_tokens", "max_total_tokens", "max_stop_sequences", "version"):
        assert key in info
    assert call(sim, "/health")[0] == 200

    status, out = call(sim, "/generate", gen_body(seed=5, do_sample=True, temperature=0.7))
    assert status == 200 and isinstance(out, dict)
    details = out["details"]
    assert details["finish_reason"] in ("eos_token", "length", "stop_sequence")
    assert details["generated_tokens"] == len(details["tokens"]) and details["seed"] == 5
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])
    if details["finish_reason"] == "eos_token":  # the end-of-turn token shows only in details.tokens
        assert details["tokens"][-1]["special"] and details["tokens"][-1]["text"] not in out["generated_text"]
    assert out["generated_text"] == "".join(t["text"] for t in details["tokens"] if not t["special"])

    status, listed = call(sim, "/", dict(gen_body(seed=5, do_sample=True, temperature=0.7), stream=False))
    assert status == 200 and isinstance(listed, list) and listed[0] == out  # same seed + prompt: same text
    texts = {call(sim, "/generate", gen_body(seed=s, do_sample=True, temperature=0.7))[1]["generated_text"]
             for s in range(6)}
    assert len(texts) > 1
    status, plain = call(sim, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert status == 200 and set(plain) == {"generated_text"}


def test_stop_sequence_and_length(sim):
    runs = [call(sim, "/generate", gen_body(f"p{i}", max_new_tokens=40))[1] for i in range(12)]
    word = runs[0]["details"]["tokens"][0]["text"].strip() or "the"
    for i in range(12):
        out = call(sim, "/generate", gen_body(f"p{i}", max_new_tokens=40, stop=[word]))[1]
        if word in runs[i]["generated_text"]:
            assert out["details"]["finish_reason"] == "stop_sequence" and out["generated_text"].endswith(word)
        else:
            assert out == runs[i]
    short = call(sim, "/generate", gen_body("q", max_new_tokens=1, seed=1, do_sample=True))[1]
    assert short["details"]["generated_tokens"] == 1


@pytest.mark.parametrize(("params", "needle"), [
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 stop sequences"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 96}, "`inputs` tokens + `max_new_tokens` must be <= 96"),
])
def test_validation_errors_are_tgi_422(sim, params, needle):
    status, out = call(sim, "/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 10, **params}})
    assert status == 422 and out["error_type"] == "validation" and needle in out["error"]


def test_too_long_input_and_bad_body(sim):
    status, out = call(sim, "/generate", gen_body("word " * 80))
    assert status == 422 and "must have less than 64 tokens" in out["error"]
    assert call(sim, "/generate", {"prompt": "x"})[0] == 422


def test_stream_sse(sim):
    req = urllib.request.Request(sim + "/generate_stream", data=json.dumps(gen_body(seed=3, do_sample=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]
    assert events and events[-1]["details"]["generated_tokens"] == len(events)
    assert all(e["generated_text"] is None for e in events[:-1])


def test_huggingface_hub_client_parses_the_standin(sim, monkeypatch):
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import ValidationError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks even 127.0.0.1
    client = InferenceClient(base_url=sim)
    out = client.text_generation("Hello", details=True, max_new_tokens=20, seed=2, temperature=0.5)
    assert out.details.finish_reason in ("eos_token", "length") and out.details.generated_tokens >= 1
    with pytest.raises(ValidationError):
        client.text_generation("Hello", max_new_tokens=5, top_p=1.0)


def test_auth_overload_and_32_concurrent(tiny_llama3):
    with launched(tiny_llama3, "--simulate", "--slots", "32", "--ms-per-token", "400", "--mean-tokens", "1000",
                  "--max-concurrent-requests", "40", "--token", "s3cret") as (url, _):
        assert call(url, "/info")[0] == 401
        status, out = call(url, "/generate", gen_body(), token="wrong")
        assert status == 401 and out["error_type"] == "authorization"
        assert call(url, "/health")[0] == 200
        assert call(url, "/info", token="s3cret")[0] == 200

        # 8 tokens x 400 ms = 3.2 s per request: all 48 requests overlap even on a loaded machine
        body = gen_body(max_new_tokens=8)
        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(lambda i: call(url, "/generate", dict(body, inputs=f"q{i}"), token="s3cret"),
                                    range(48)))
        statuses = sorted(s for s, _ in results)
        assert statuses.count(200) == 40 and statuses.count(429) == 8
        assert all(out["error_type"] == "overloaded" for s, out in results if s == 429)
        metrics = call(url, "/metrics", token="s3cret")[1]
        assert "tgi_standin_overloaded_429 8" in metrics


def test_injected_faults_follow_the_fault_seed(tiny_llama3):
    rates = {"--fail-503": 0.2, "--fail-429": 0.1, "--drop": 0.1, "--stall": 0.1}
    args = [x for k, v in rates.items() for x in (k, str(v))]
    with launched(tiny_llama3, "--simulate", "--ms-per-token", "0", "--stall-s", "0.3", "--fault-seed", "7",
                  *args) as (url, _):
        seen = []
        for i in range(40):
            try:
                status, out = call(url, "/generate", gen_body(f"x{i}"), timeout=10)
            except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError):
                seen.append("drop")
                continue
            seen.append({503: "503", 429: "429", 504: "stall", 200: "ok"}[status])
            if status != 200:
                assert set(out) == {"error", "error_type"}
    rng, expected = random.Random(7), []
    for _ in range(40):
        roll, kind = rng.random(), "ok"
        for rate, name in zip(rates.values(), ("503", "429", "drop", "stall"), strict=True):
            if roll < rate:
                kind = name
                break
            roll -= rate
        expected.append(kind)
    assert seen == expected and len(set(seen)) == 5


def test_model_mode_generates_with_the_tiny_model(tiny_llama3, tmp_path):
    log = tmp_path / "requests.jsonl"
    with launched(tiny_llama3, "--log-requests", str(log)) as (url, _):
        greedy = gen_body("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", max_new_tokens=24)
        status, a = call(url, "/generate", greedy)
        assert status == 200 and a == call(url, "/generate", greedy)[1]  # greedy is deterministic
        assert a["details"]["seed"] is None and a["details"]["generated_tokens"] >= 1
        tokens = a["details"]["tokens"]
        if a["details"]["finish_reason"] == "eos_token":
            assert tokens[-1]["special"]
        assert all(t["logprob"] <= 0 for t in tokens)
        word = next((t["text"] for t in tokens[2:] if not t["special"] and t["text"].strip()), None)
        if word is not None:
            status, b = call(url, "/generate", dict(greedy, parameters=dict(greedy["parameters"], stop=[word])))
            assert b["details"]["finish_reason"] == "stop_sequence" and b["generated_text"].endswith(word)
        sampled = [call(url, "/generate", gen_body("Hi", max_new_tokens=12, seed=s, temperature=1.0,
                                                   do_sample=True))[1]["generated_text"] for s in (1, 1, 2)]
        assert sampled[0] == sampled[1]
    first = json.loads(log.read_text().splitlines()[0])
    assert first["body"]["inputs"].startswith("<|begin_of_text|>") and first["input_ids"]
