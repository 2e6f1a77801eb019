#!/usr/bin/env python
"""Benchmark the local transformers backend on the real model, in one run (offline, CPU is fine).

1. Local backend vs raw ``model.generate`` (same prompts, batch size and threads): N sampled first-turn
   instructions (the pre-query prompt, temperature 1, ``--max-new-tokens``), useful tokens/s = tokens up to
   and including each row's end of turn. Raw ``generate`` runs batches of B in float32 (what transformers
   does by default) and in the backend's dtype; the backend runs with its defaults (dtype ``auto``, shared
   prefix reuse) and, with ``--breakdown``, with the prefix cache off and in float32.
2. ``--threads 1,2``: the backend's default configuration at each thread count (the thread policy).
3. ``--llama-server PATH_OR_URL``: the same single-turn recipe (``--recipe-rows`` conversations through the
   conversation engine) on the local backend and on a llama.cpp server (started here from the binary on the
   model's GGUF with ``-t THREADS --parallel B``, or reached at the URL) through the ``openai`` backend;
   rows/s and generated tok/s, ratio local / llama.cpp.
4. ``--rss-rows 100,400``: peak RSS of generation runs of R1 vs R2 rows (fresh child processes): it should
   stay flat.

Every ratio in the closing markdown table comes from this one run. The machine load (1-minute load
average before and after) is printed with it: on a shared machine, rerun when it was high.

    python scripts/bench_local.py                                # ~3-4 minutes on 2 cores
    python scripts/bench_local.py --breakdown --threads 1,2 --llama-server /work/tools/llama/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import magpie_hub.chat.demo_models  # noqa: E402,F401 - registers tiny: references
import magpie_hub.gguf_models as gguf_models  # noqa: E402 - registers smollm2 and *.gguf references
from magpie_hub.chat.format import load_chat_format  # noqa: E402
from magpie_hub.generate.backends.base import GenerationRequest, SamplingParams  # noqa: E402
from magpie_hub.generate.backends.http.openai import OpenAICompletionsBackend  # noqa: E402
from magpie_hub.generate.backends.local.transformers import TransformersBackend  # noqa: E402
from magpie_hub.generate.engine import (  # noqa: E402
    CleanupOptions,
    ConversationEngine,
    ConversationSpec,
    conversation_to_row,
)
from magpie_hub.models import resolve_model  # noqa: E402


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "inf (nothing finished)"


# -- 1. local backend vs raw generate ------------------------------------------------------------------------
async def backend_run(model: str, args, *, threads: int | None, **options) -> dict:
    backend = TransformersBackend(model, batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                                  num_threads=threads, **options)
    async with backend:
        fmt = backend.chat_format
        reqs = [GenerationRequest(fmt.user_prompt([]), SamplingParams(1.0, 1.0, args.max_new_tokens,
                                                                      seed=args.seed + i), fmt.user_stop, "user")
                for i in range(args.rows)]
        started = time.perf_counter()
        results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        wall = time.perf_counter() - started
    tokens = sum(r.generated_tokens for r in results)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "dtype": backend.info().extra["dtype"],
            "sample": results[0].text, "stats": backend.stats(), "threads": torch.get_num_threads(),
            "choices": backend.info().extra["choices"]}


def generate_run(model: str, args, *, threads: int, dtype: str) -> dict:
    torch.set_num_threads(threads)
    fmt = load_chat_format(model)
    tok = fmt.tokenizer
    lm = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=getattr(torch, dtype)).eval()
    ids = tok(fmt.user_prompt([]), add_special_tokens=not fmt.bos_in_template, return_tensors="pt")["input_ids"]
    stops = [int(i) for i in fmt.stop_token_ids if i is not None]
    with torch.inference_mode():                      # warm-up (kernel selection), not timed
        lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                    pad_token_id=stops[0])
    tokens, started = 0, time.perf_counter()
    for first in range(0, args.rows, args.batch_size):
        n = min(args.batch_size, args.rows - first)
        torch.manual_seed(args.seed + first)
        with torch.inference_mode():
            out = lm.generate(ids.repeat(n, 1), attention_mask=torch.ones((n, ids.shape[1]), dtype=torch.long),
                              do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=args.max_new_tokens, eos_token_id=stops, pad_token_id=stops[0])
        for row in out[:, ids.shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            tokens += ends[0] + 1 if ends else len(row)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "dtype": dtype}


# -- 3. the same recipe through the local backend and a llama.cpp server --------------------------------------
def specs(rows: int, args):
    for i in range(rows):                     # lazy, like the build's spec generator
        yield ConversationSpec(
            config="bench", index=i, uuid=f"bench-{i}", turns=args.turns, category=None, system_prompt=None,
            instruction_params=SamplingParams(1.0, 1.0, args.recipe_instruction_tokens, seed=args.seed),
            response_params=SamplingParams(args.response_temperature, 1.0, args.recipe_response_tokens,
                                           seed=args.seed))


async def recipe_run(backend, model: str, args, *, rows: int, sink=None) -> dict:
    async with backend:
        fmt = getattr(backend, "chat_format", None) or load_chat_format(model)
        engine = ConversationEngine(backend, fmt, cleanup=CleanupOptions(), concurrency=args.recipe_concurrency,
                                    max_attempts=args.max_attempts, seed=args.seed)
        started, kept, kept_tokens = time.perf_counter(), 0, 0

        async def consume() -> None:
            nonlocal kept, kept_tokens
            async for conv in engine.run(specs(rows, args)):
                kept += 1
                kept_tokens += conv.generated_tokens
                if sink is not None:
                    row = conversation_to_row(conv, model=model, chat_format=fmt, seed=args.seed)
                    sink.write(json.dumps(row) + "\n")

        try:
            await asyncio.wait_for(consume(), args.recipe_timeout)
            timed_out = False
        except TimeoutError:                  # a pathological run: the rows/s so far is the measurement
            timed_out = True
        wall = time.perf_counter() - started
    return {"rows": kept, "timed_out": timed_out, "wall_s": wall, "tokens": engine.generated_tokens, "kept_tokens": kept_tokens,
            "tok_s": engine.generated_tokens / wall, "rows_s": kept / wall, "dropped": dict(engine.dropped),
            "requests": engine.requests}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama(binary: str, gguf: str, threads: int, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "--parallel", str(args.recipe_concurrency), "-c", str(args.llama_ctx), *args.llama_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}: {' '.join(cmd)}")
    proc.kill()
    raise SystemExit("llama-server did not become healthy within 120 s")


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


# -- 4. memory ------------------------------------------------------------------------------------------------
def rss_child(model: str, rows: int, args) -> None:
    backend = TransformersBackend(model, batch_size=args.batch_size, max_wait_ms=args.max_wait_ms)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "rows.jsonl", "w", encoding="utf-8") as sink:
        stats = asyncio.run(recipe_run(backend, model, args, rows=rows, sink=sink))
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(stats))


def rss_check(args) -> list[tuple[str, str, str]]:
    results = []
    for rows in [int(x) for x in args.rss_rows.split(",")]:
        cmd = [sys.executable, __file__, "--rss-child", str(rows), *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
        print(f"  rss: {rows} rows, peak RSS {results[-1]['peak_rss_mb']:.0f} MB", flush=True)
    growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    return [(f"peak RSS {results[-1]['rows']} / {results[0]['rows']} rows", f"{growth:.2f}x",
             "flat" if growth < 1.15 else "GROWS")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=128, help="instruction requests per local/generate run")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", default="", help="thread counts to compare, e.g. 1,2 (default: the policy's)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=False,
                    help="also run the backend without prefix reuse and in float32")
    ap.add_argument("--llama-server", default=None, help="llama-server binary or http://host:port of a running one")
    ap.add_argument("--llama-threads", default="2", help="llama-server -t, e.g. 1,2 to run both")
    ap.add_argument("--llama-args", default="", help="more llama-server arguments, e.g. '--poll 0'")
    ap.add_argument("--llama-ctx", type=int, default=32768)
    ap.add_argument("--recipe-rows", type=int, default=32)
    ap.add_argument("--recipe-concurrency", type=int, default=32, help="engine concurrency = llama --parallel "
                    "= local batch size")
    ap.add_argument("--recipe-instruction-tokens", type=int, default=128)
    ap.add_argument("--recipe-response-tokens", type=int, default=256)
    ap.add_argument("--response-temperature", type=float, default=1.0)
    ap.add_argument("--recipe-timeout", type=float, default=600.0, help="stop a recipe run after this many s")
    ap.add_argument("--turns", type=int, default=1)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--max-attempts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-rows", default="", help="e.g. 100,400: peak RSS of two run sizes (child processes)")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    model = args.model
    if args.rss_child is not None:
        rss_child(model, args.rss_child, args)
        return
    load_before = load()
    warm = asyncio.run(backend_run(model, argparse.Namespace(**{**vars(args), "rows": 4}), threads=None))
    policy_threads = warm["threads"]                 # the backend's own policy for this model and machine
    thread_counts = [int(t) for t in args.threads.split(",") if t] or [policy_threads]
    main_threads = policy_threads if policy_threads in thread_counts else thread_counts[0]
    print(f"model {model}, {args.rows} instruction rows, max_new_tokens {args.max_new_tokens}, batch "
          f"{args.batch_size}, cores {os.cpu_count()}, load {load_before}; backend choices: {warm['choices']}",
          flush=True)

    runs: dict[str, dict] = {}

    def record(name: str, result: dict) -> None:
        runs[name] = result
        print(f"  {name}: {result['tokens']} tokens in {result['wall_s']:.1f} s = {result['tok_s']:.0f} tok/s",
              flush=True)

    for t in thread_counts:
        record(f"local t{t}", asyncio.run(backend_run(model, args, threads=t)))
    dtype = runs[f"local t{main_threads}"]["dtype"]
    record("generate float32", generate_run(model, args, threads=main_threads, dtype="float32"))
    if dtype != "float32":
        record(f"generate {dtype}", generate_run(model, args, threads=main_threads, dtype=dtype))
    if args.breakdown:
        record("local no prefix", asyncio.run(backend_run(model, args, threads=main_threads, prefix_cache=False)))
        if dtype != "float32":
            record("local float32", asyncio.run(backend_run(model, args, threads=main_threads, dtype="float32")))
    local = runs[f"local t{main_threads}"]
    print(f"  sample instruction ({dtype}): {local['sample'][:160]!r}")
    if "local float32" in runs:
        print(f"  sample instruction (float32): {runs['local float32']['sample'][:160]!r}")
    print(f"  backend stats: {local['stats']}")

    table = [("local backend / raw generate, same dtype "
              f"({dtype}, B={args.batch_size}, {main_threads} thr)",
              f"{local['tok_s']:.0f} / {runs[f'generate {dtype}']['tok_s']:.0f} tok/s",
              f"{local['tok_s'] / runs[f'generate {dtype}']['tok_s']:.2f}x"),
             (f"local backend ({dtype}) / raw generate float32",
              f"{local['tok_s']:.0f} / {runs['generate float32']['tok_s']:.0f} tok/s",
              f"{local['tok_s'] / runs['generate float32']['tok_s']:.2f}x")]
    if "local no prefix" in runs:
        table.append(("prefix reuse on / off", f"{local['tok_s']:.0f} / {runs['local no prefix']['tok_s']:.0f} tok/s",
                      f"{local['tok_s'] / runs['local no prefix']['tok_s']:.2f}x"))
    if "local float32" in runs:
        table.append((f"backend {dtype} / float32", f"{local['tok_s']:.0f} / {runs['local float32']['tok_s']:.0f} "
                      "tok/s", f"{local['tok_s'] / runs['local float32']['tok_s']:.2f}x"))
    for t in thread_counts:
        if t != main_threads:
            other = runs[f"local t{t}"]
            table.append((f"backend {t} / {main_threads} threads", f"{other['tok_s']:.0f} / {local['tok_s']:.0f} tok/s",
                          f"{other['tok_s'] / local['tok_s']:.2f}x"))

    if args.llama_server:
        rec_args = {"batch_size": args.recipe_concurrency, "max_wait_ms": args.max_wait_ms, "num_threads": main_threads}
        print(f"recipe: {args.recipe_rows} {args.turns}-turn rows, instruction <= {args.recipe_instruction_tokens}, "
              f"response <= {args.recipe_response_tokens} tokens (T={args.response_temperature}), concurrency "
              f"{args.recipe_concurrency}", flush=True)
        mine = asyncio.run(recipe_run(TransformersBackend(model, **rec_args), model, args, rows=args.recipe_rows))
        print(f"  local ({main_threads} thr): {mine}", flush=True)
        gguf = gguf_models.embedded_gguf(model) if model == "smollm2" else resolve_model(model)
        remote_threads = [int(t) for t in args.llama_threads.split(",")] if not args.llama_server.startswith("http") \
            else ["?"]
        for threads in remote_threads:
            proc = None
            if args.llama_server.startswith("http"):
                url = args.llama_server.rstrip("/")
            else:
                proc, url = start_llama(args.llama_server, gguf, threads, args)
            try:
                remote = OpenAICompletionsBackend(model, endpoint=url, served_model=served_model(url),
                                                  check_model=False, max_concurrency=args.recipe_concurrency)
                theirs = asyncio.run(recipe_run(remote, model, args, rows=args.recipe_rows))
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)
            print(f"  llama.cpp ({threads} thr): {theirs}", flush=True)
            table += [(f"recipe rows/s local ({main_threads} thr) / llama.cpp ({threads} thr), {theirs['rows']} rows",
                       f"{mine['rows_s']:.3f} / {theirs['rows_s']:.3f}", ratio(mine['rows_s'], theirs['rows_s'])),
                      (f"recipe generated tok/s local ({main_threads} thr) / llama.cpp ({threads} thr)",
                       f"{mine['tok_s']:.0f} / {theirs['tok_s']:.0f}", ratio(mine['tok_s'], theirs['tok_s']))]
    if args.rss_rows:
        table += rss_check(args)

    print(f"\nload average (1 min): {load_before} before, {load()} after; {os.cpu_count()} cores\n")
    print("| measured in this run | values | ratio |\n|---|---|---|")
    for row in table:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
