#!/usr/bin/env python
"""Benchmark the local transformers path on the tiny model (offline, CPU is fine).

1. Throughput: generated tokens/s of the batched path (engine concurrency C, dynamic batches of B) vs
   one conversation at a time (concurrency 1, batch 1), measured in the same process, same settings.
2. Memory: peak RSS of a generation run of R1 vs R2 rows (each in a fresh child process, rows converted
   with ``conversation_to_row`` and appended to a JSONL file as the build does): it should stay flat.

    python scripts/bench_local.py                     # defaults below; ~3-6 minutes on 2 busy cores
    python scripts/bench_local.py --batch-size 32 --concurrency 64       # the demo recipe's batch size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from magpie_hub.generate.backends.base import SamplingParams  # noqa: E402
from magpie_hub.generate.backends.local.transformers import TransformersBackend  # noqa: E402
from magpie_hub.generate.engine import (  # noqa: E402
    CleanupOptions,
    ConversationEngine,
    ConversationSpec,
    conversation_to_row,
)

MT_SYSTEM = ("You are a helpful Al assistant. The user will engage in a multi-round conversation with you, "
             "asking initial questions and following up with additional related questions. Your goal is to "
             "provide thorough,relevant and insightful responses to help the user with their queries.")


def specs(rows: int, args) -> object:
    for i in range(rows):                     # lazy, like the build's spec generator
        yield ConversationSpec(
            config="bench", index=i, uuid=f"bench-{i}", turns=args.turns, category=None, system_prompt=None,
            instruction_params=SamplingParams(1.0, 1.0, args.max_new_tokens, seed=args.seed),
            response_params=SamplingParams(args.response_temperature, 1.0, args.max_new_tokens, seed=args.seed))


async def generate(model: str, rows: int, *, batch_size: int, concurrency: int, args, sink=None,
                   continuous: bool = True) -> dict:
    backend = TransformersBackend(model, batch_size=batch_size, max_wait_ms=args.max_wait_ms, continuous=continuous)
    async with backend:
        engine = ConversationEngine(backend, backend.chat_format, cleanup=CleanupOptions(),
                                    multi_turn_system_prompt=MT_SYSTEM, concurrency=concurrency,
                                    max_attempts=args.max_attempts)
        started, kept = time.perf_counter(), 0
        async for conv in engine.run(specs(rows, args)):
            kept += 1
            if sink is not None:
                row = conversation_to_row(conv, model=model, chat_format=backend.chat_format, seed=args.seed)
                sink.write(json.dumps(row) + "\n")
        wall = time.perf_counter() - started
    stats = backend.stats()
    return {"rows": kept, "wall_s": wall, "tokens": engine.generated_tokens, "tok_s": engine.generated_tokens / wall,
            "rows_s": kept / wall, "dropped": dict(engine.dropped), "mean_batch": stats["mean_batch"],
            "slot_use": engine.generated_tokens / max(1, stats["row_steps"]),
            "continuous": backend.info().extra["continuous_batching"]}


def rss_child(model: str, rows: int, args) -> None:
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "rows.jsonl", "w", encoding="utf-8") as sink:
        stats = asyncio.run(generate(model, rows, batch_size=args.batch_size, concurrency=args.concurrency,
                                     args=args, sink=sink))
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(stats))


def _child_args(args) -> list[str]:
    return ["--model", args.model, "--turns", str(args.turns), "--max-new-tokens", str(args.max_new_tokens),
            "--response-temperature", str(args.response_temperature), "--batch-size", str(args.batch_size),
            "--concurrency", str(args.concurrency), "--seed", str(args.seed), "--max-attempts",
            str(args.max_attempts), "--max-wait-ms", str(args.max_wait_ms)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama3")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--response-temperature", type=float, default=1.0,
                    help="1.0 by default: greedy replies of the random-weight tiny model end at once")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--max-attempts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batched-rows", type=int, default=384)
    ap.add_argument("--sequential-rows", type=int, default=32)
    ap.add_argument("--rss-rows", default="100,400")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from magpie_hub.chat.demo_models import resolve_model

    model = resolve_model(args.model)
    if args.rss_child is not None:
        rss_child(model, args.rss_child, args)
        return
    import torch

    asyncio.run(generate(model, 4, batch_size=4, concurrency=4, args=args))            # warm-up
    print(f"model {args.model}, {args.turns}-turn conversations, max_new_tokens {args.max_new_tokens}, "
          f"response temperature {args.response_temperature}, torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}")
    seq = asyncio.run(generate(model, args.sequential_rows, batch_size=1, concurrency=1, args=args))
    gen = asyncio.run(generate(model, args.batched_rows, batch_size=args.batch_size, concurrency=args.concurrency,
                               args=args, continuous=False))
    bat = asyncio.run(generate(model, args.batched_rows, batch_size=args.batch_size,
                               concurrency=args.concurrency, args=args))
    print()
    print(f"{'path':<40}{'rows':>6}{'tokens':>9}{'wall s':>8}{'tok/s':>8}{'rows/s':>8}{'batch':>7}{'slots':>7}"
          f"{'ratio':>7}")
    for name, r in (("one conversation at a time", seq),
                    (f"model.generate batches B={args.batch_size} C={args.concurrency}", gen),
                    (f"continuous batching B={args.batch_size} C={args.concurrency}", bat)):
        print(f"{name:<40}{r['rows']:>6}{r['tokens']:>9}{r['wall_s']:>8.1f}{r['tok_s']:>8.0f}{r['rows_s']:>8.2f}"
              f"{r['mean_batch']:>7.1f}{r['slot_use']:>7.2f}{r['tok_s'] / seq['tok_s']:>6.1f}x")
    ratio = bat["tok_s"] / seq["tok_s"]
    print(f"throughput ratio batched / sequential: {ratio:.1f}x (goal >= 5x) {'OK' if ratio >= 5 else 'BELOW GOAL'}")
    print(f"dropped (batched run): {bat['dropped']}; identical to the generate() path: "
          f"{bat['dropped'] == gen['dropped'] and bat['tokens'] == gen['tokens']}")

    results = []
    for rows in [int(x) for x in args.rss_rows.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(rows), *_child_args(args)],
                              capture_output=True, text=True, check=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    print()
    print(f"{'rows':>6}{'peak RSS MB':>13}{'tok/s':>9}")
    for r in results:
        print(f"{r['rows']:>6}{r['peak_rss_mb']:>13.1f}{r['tok_s']:>9.0f}")
    growth = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"peak RSS ratio {results[-1]['rows']} / {results[0]['rows']} rows: {growth:.2f}x "
          f"({'flat' if growth < 1.15 else 'GROWS'})")


if __name__ == "__main__":
    main()
