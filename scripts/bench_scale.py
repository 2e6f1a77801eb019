"""Scaling benchmark: ``magpie-hub build`` throughput vs servers in an endpoint pool, and vs local workers.

(a) Pool: 1, 2, 4 simulated TGI servers (tests/tgi_server.py --simulate: ``--slots`` concurrent sequences at
    ``--ms-per-token``, so each server's capacity is exactly slots * 1000 / ms tokens/s; lengths geometric with
    mean ``--mean-tokens``, capped at ``--max-new-tokens``), one ``magpie-hub
    build`` through ``backend_options.endpoints`` with ``--rows-per-server`` single-turn rows per server.
    Each server admits ``2 * slots`` requests (it queues the excess for its slots, as TGI's
    ``max_concurrent_requests`` exceeds its batch), which is the pool's weight for it; the build keeps that
    many conversations in flight. The ratio counts the run's ramp-up and drain, so the rows per server
    must be many times the conversations in flight (measured: 300 rows per server, 16 slots at 40 ms).
    Pool throughput = the tokens the servers generated / the wall-clock window from the first request any
    server received to the last answer any server sent (measured by the servers). Printed against the sum of
    the live servers' capacities; goal >= 0.9.
(b) Workers: ``torchrun --nproc_per_node K -m magpie_hub.cli build`` (K = 1, 2, 4) with the ``dummy`` backend
    (``--delay-ms`` per request, ``--concurrency`` per worker: a fixed-latency "device" per worker, so the
    ideal is K times one worker). Throughput = rows / the build's generation wall time (manifest
    ``wall_time_s``: the pieces' wall time per process, start-up excluded).

Run: ``python scripts/bench_scale.py [--servers 1 2 4] [--workers 1 2 4] [--rows-per-server 300]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tgi_server import launched_many  # noqa: E402


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return {k.removeprefix("tgi_standin_"): float(v) for k, v in (ln.split() for ln in resp.read().decode().splitlines())}


def env() -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out.pop("HF_HUB_OFFLINE", None)
    return out


def tiny_model() -> Path:
    from magpie_hub.chat.demo_models import build_tiny_model  # an edge script: the demo model is fine here

    return build_tiny_model("llama3", chat_template_from=ROOT / "tests" / "data" / "tokenizers" / "llama-3-8b-instruct")


def recipe(path: Path, model: str, backend: str, options: dict, rows: int, concurrency: int, max_new: int = 512) -> Path:
    path.write_text(f"""name: bench-scale
model: {model}
backend: {backend}
backend_options: {json.dumps(options)}
seed: 1
instruction_sampling: [{{temperature: 1.0, top_p: 1.0}}]
max_new_tokens: {{instruction: {max_new}, response: {max_new}}}
max_attempts: 20
concurrency: {concurrency}
configs:
  single_turn: {{rows: {rows}}}
""")
    return path


def bench_pool(args, model: Path, work: Path) -> list[dict]:
    sim = ("--simulate", "--slots", str(args.slots), "--ms-per-token", str(args.ms_per_token), "--mean-tokens",
           str(args.mean_tokens), "--max-concurrent-requests", str(2 * args.slots))   # queues, like TGI
    results = []
    for n in args.servers:
        with launched_many(model, n, *sim) as servers:
            urls = [u for u, _ in servers]
            rows = args.rows_per_server * n
            path = recipe(work / f"pool{n}.yaml", str(model), "tgi", {"endpoints": urls, "timeout": 60}, rows,
                          concurrency=2 * args.slots * n, max_new=args.max_new_tokens)
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "magpie_hub.cli", "build", str(path), "--out",
                                   str(work / f"pool{n}"), "--fresh"], env=env(), capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            wall = time.monotonic() - started
            m = [metrics(u) for u in urls]
        first = min(x["started_unix"] + x["first_request_s"] for x in m)
        last = max(x["started_unix"] + x["last_response_s"] for x in m)
        tokens = sum(x["generated_tokens"] for x in m)
        capacity = n * args.slots * 1000.0 / args.ms_per_token
        per = [int(x["generated_tokens"]) for x in m]
        results.append({"servers": n, "rows": rows, "tokens": int(tokens), "window_s": round(last - first, 2),
                        "tok_s": round(tokens / (last - first), 1), "capacity": capacity,
                        "ratio": round(tokens / (last - first) / capacity, 3), "per_server_tokens": per,
                        "build_wall_s": round(wall, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def bench_workers(args, work: Path) -> list[dict]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    results = []
    for k in args.workers:
        rows = args.rows_per_worker * k
        path = recipe(work / f"w{k}.yaml", "tiny:llama3", "dummy", {"delay_ms": args.delay_ms}, rows,
                      concurrency=args.concurrency)
        cmd = [sys.executable, "-m", "magpie_hub.cli"] if k == 1 else [torchrun, "--standalone", "--nproc_per_node",
                                                                        str(k), "-m", "magpie_hub.cli"]
        started = time.monotonic()
        proc = subprocess.run([*cmd, "build", str(path), "--out", str(work / f"w{k}"), "--fresh"], env=env(),
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        entry = json.loads((work / f"w{k}" / "magpie_manifest.json").read_text())["configs"]["single_turn"]
        gen_s = float(entry["wall_time_s"])
        results.append({"workers": k, "rows": rows, "gen_wall_s": round(gen_s, 2), "rows_s": round(rows / gen_s, 2),
                        "run_wall_s": round(time.monotonic() - started, 1)})
        print(json.dumps(results[-1]), flush=True)
    base = results[0]["rows_s"] / results[0]["workers"] if results else 1.0
    for r in results:
        r["speedup_vs_ideal"] = round(r["rows_s"] / (base * r["workers"]), 3)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--rows-per-server", type=int, default=300)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ms-per-token", type=float, default=40.0)
    ap.add_argument("--mean-tokens", type=float, default=24.0)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="caps a request's length, so the run's tail "
                    "(the last requests, with the servers no longer full) is short")
    ap.add_argument("--rows-per-worker", type=int, default=60)
    ap.add_argument("--delay-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    model = tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        pool = bench_pool(args, model, work) if args.servers else []
        workers = bench_workers(args, work) if args.workers else []
    print("\n| servers | rows | tokens | window s | pool tok/s | sum of capacities | ratio |\n|---|---|---|---|---|---|---|")
    for r in pool:
        print(f"| {r['servers']} | {r['rows']} | {r['tokens']} | {r['window_s']} | {r['tok_s']} | {r['capacity']:.0f} | "
              f"{r['ratio']} |")
    print("\n| workers | rows | generation s | rows/s | vs K x one worker |\n|---|---|---|---|---|")
    for r in workers:
        print(f"| {r['workers']} | {r['rows']} | {r['gen_wall_s']} | {r['rows_s']} | {r['speedup_vs_ideal']} |")


if __name__ == "__main__":
    main()
