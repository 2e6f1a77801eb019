"""Benchmark the tgi backend against the simulated TGI stand-in (tests/tgi_server.py --simulate).

(a) ``magpie-hub build`` of a 3-turn config (``--rows-a`` conversations) through ``--backend tgi``:
    generated tokens per second, measured by the server between its first request and its last
    answer (the client's start-up is not counted, its tail is), divided by the server's capacity
    (slots * 1000 / ms_per_token tokens/s). Goal >= 0.95.
(b) The same 3-turn workload (``--rows`` conversations) with magpie-hub and with distilabel 1.5.3's
    ``MagpieGenerator`` + ``InferenceEndpointsLLM`` (in its own venv, created on first use with the pins
    that install together), each against a fresh server with the same settings: ratio ours / theirs.
    Goal >= 1.5x. distilabel runs as a bare step (``gen.load(); gen.process()``), without a Pipeline
    (its most favourable setting), at each ``--batches`` size; the best is compared.

Turn lengths are geometric with mean ``--mean-tokens`` (default 128: between MAGPIE's short instructions
and long responses), ending with the eos token or at ``--max-new-tokens`` (default 1024; MAGPIE's own
scripts allow 2048-4096: a cap far above the mean, so truncation is rare for both tools).
Run: ``python scripts/bench_tgi.py [--rows 256] [--rows-a 1024] [--slots 32] [--ms-per-token 5]
[--skip-distilabel]``. The model is the embedded tiny Llama-3 (its tokenizer and chat template render
the prompts; the simulated server does not run it).
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

from tgi_server import launched  # noqa: E402

DISTILABEL_PINS = ["distilabel==1.5.3", "huggingface_hub<1", "datasets<4", "transformers<5", "requests",
                   "torch==2.13.0"]

DISTILABEL_RUN = r'''
import json, sys, time
from distilabel.models.llms import InferenceEndpointsLLM
from distilabel.steps.tasks import MagpieGenerator

url, tokenizer_dir, rows, batch, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = InferenceEndpointsLLM(base_url=url, tokenizer_id=tokenizer_dir, magpie_pre_query_template="llama3",
                            generation_kwargs={"max_new_tokens": max_new, "temperature": 1.0})
gen = MagpieGenerator(llm=llm, n_turns=3, num_rows=rows, batch_size=batch)
gen.load()
started = time.monotonic()
out, complete = [], 0
for batch_rows, _last in gen.process():
    out.extend(batch_rows)
elapsed = time.monotonic() - started
for row in out:
    conv = row.get("conversation") or []
    complete += len(conv) >= 6 and all(m.get("content") for m in conv)
print("RESULT " + json.dumps({"rows": len(out), "complete_rows": complete, "seconds": elapsed}))
'''


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return {k.removeprefix("tgi_standin_"): float(v)
                for k, v in (line.split() for line in resp.read().decode().splitlines())}


def server_args(a: argparse.Namespace) -> list[str]:
    return ["--simulate", "--slots", str(a.slots), "--ms-per-token", str(a.ms_per_token),
            "--mean-tokens", str(a.mean_tokens), "--max-concurrent-requests", str(a.max_concurrent_requests),
            "--max-total-tokens", "4096", "--max-input-tokens", "3072"]


def summarize(name: str, m: dict, rows: int, wall: float, capacity: float) -> dict:
    window = max(1e-9, m["last_response_s"] - m["first_request_s"])
    tps = m["generated_tokens"] / window
    return {"run": name, "rows": rows, "requests": int(m["success"]), "tokens": int(m["generated_tokens"]),
            "window_s": window, "wall_s": wall, "tok_s": tps, "util": tps / capacity,
            "rows_s": rows / window, "faults": int(m["overloaded_429"])}


def run_ours(a: argparse.Namespace, model_dir: str, capacity: float, work: Path, rows: int) -> dict:
    recipe = work / f"bench-{rows}.yaml"
    recipe.write_text(f"""name: bench-tgi
model: {model_dir}
backend: tgi
seed: 1
instruction_sampling: [{{temperature: 1.0, top_p: 1.0, share: 1.0}}]
response_sampling: {{temperature: 1.0}}
max_new_tokens: {{instruction: {a.max_new_tokens}, response: {a.max_new_tokens}}}
concurrency: {a.concurrency}
max_attempts: 50
configs:
  multi_turn: {{rows: {rows}, turns: 3}}
""")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    with launched(model_dir, *server_args(a)) as (url, _):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "magpie_hub.cli", "build", str(recipe), "--out",
                               str(work / f"ours-{rows}"), "--endpoint", url, "--fresh"], env=env, cwd=work,
                              capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"magpie-hub build failed:\n{proc.stderr[-3000:]}")
        m = metrics(url)
    manifest = json.loads((work / f"ours-{rows}" / "magpie_manifest.json").read_text())
    done = manifest["configs"]["multi_turn"]["rows"]
    return summarize(f"magpie-hub tgi ({rows} rows)", m, done, wall, capacity)


def distilabel_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    marker = path / ".installed"
    if not marker.exists():
        print(f"creating the distilabel venv in {path} (a few minutes, once)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DISTILABEL_PINS], check=True)
        marker.write_text(" ".join(DISTILABEL_PINS))
    return python


def legacy_tokenizer_dir(model_dir: str, work: Path) -> Path:
    """The tokenizer files for transformers 4 (distilabel's pin): transformers 5 saves the class name
    ``TokenizersBackend``, which 4.x does not know; the tokenizer.json itself is the same."""
    out = work / "tokenizer-for-transformers4"
    out.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json"):
        if (Path(model_dir) / name).is_file():
            shutil.copy(Path(model_dir) / name, out / name)
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    if (out / "chat_template.jinja").is_file():
        config["chat_template"] = (out / "chat_template.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def run_distilabel(a: argparse.Namespace, model_dir: str, capacity: float, work: Path, batch: int) -> dict:
    python = distilabel_venv(a.venv)
    tokenizer_dir = legacy_tokenizer_dir(model_dir, work)
    script = work / "distilabel_run.py"
    script.write_text(DISTILABEL_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",)}
    env.update(HF_TOKEN="hf_dummy_token_for_local_server", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", DISTILABEL_LOG_LEVEL="WARNING")
    with launched(model_dir, *server_args(a)) as (url, _):
        started = time.monotonic()
        proc = subprocess.run([str(python), str(script), url, str(tokenizer_dir), str(a.rows), str(batch),
                               str(a.max_new_tokens)], env=env, cwd=work, capture_output=True, text=True)
        wall = time.monotonic() - started
        m = metrics(url)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"distilabel run failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line[7:])
    out = summarize(f"distilabel 1.5.3 (batch {batch})", m, res["complete_rows"], wall, capacity)
    out["returned_rows"] = res["rows"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="3-turn conversations per run of (b), both tools")
    ap.add_argument("--rows-a", type=int, default=1024, help="3-turn conversations of run (a)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--ms-per-token", type=float, default=5.0)
    ap.add_argument("--mean-tokens", type=float, default=128.0, help="simulated mean turn length (tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--max-concurrent-requests", type=int, default=128, help="server's limit (TGI default)")
    ap.add_argument("--concurrency", type=int, default=256, help="our conversations in flight")
    ap.add_argument("--batches", type=int, nargs="*", default=[50, 128], help="distilabel batch sizes")
    ap.add_argument("--skip-distilabel", action="store_true")
    ap.add_argument("--venv", type=Path, default=Path(os.environ.get("MAGPIE_HUB_CACHE", Path.home() / ".cache"
                                                                       / "magpie-hub")) / "bench" / "distilabel-1.5.3")
    a = ap.parse_args(argv)
    from magpie_hub.chat.demo_models import build_tiny_model

    model_dir = str(build_tiny_model("llama3"))
    capacity = a.slots * 1000.0 / a.ms_per_token
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tgi-") as tmp:
        work = Path(tmp)
        results.append(run_ours(a, model_dir, capacity, work, a.rows_a))
        if not a.skip_distilabel:
            results.append(run_ours(a, model_dir, capacity, work, a.rows))
            for batch in a.batches:
                results.append(run_distilabel(a, model_dir, capacity, work, batch))
    print(f"\nsimulated TGI: {a.slots} slots x {a.ms_per_token:g} ms/token = capacity {capacity:,.0f} tok/s; "
          f"3-turn conversations, max_new_tokens {a.max_new_tokens}, "
          f"mean turn {a.mean_tokens:g} tokens; cpu cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}\n")
    head = f"{'run':<30}{'rows':>6}{'requests':>9}{'gen tok':>9}{'window s':>9}{'tok/s':>8}{'util':>7}{'rows/s':>8}"
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['run']:<30}{r['rows']:>6}{r['requests']:>9}{r['tokens']:>9}{r['window_s']:>9.1f}"
              f"{r['tok_s']:>8.0f}{r['util']:>7.1%}{r['rows_s']:>8.2f}")
    ours = results[0]
    print(f"\n(a) magpie-hub achieved / capacity = {ours['util']:.3f} (goal >= 0.95)")
    if len(results) > 1:
        same, best = results[1], max(results[2:], key=lambda r: r["rows_s"])
        print(f"(b) {a.rows} rows each: ours / distilabel (its best batch size), complete 3-turn rows per second = "
              f"{same['rows_s'] / best['rows_s']:.1f}x; generated tokens/s = {same['tok_s'] / best['tok_s']:.1f}x "
              "(goal >= 1.5x)")
        for r in results[2:]:
            print(f"    {r['run']}: returned {r['returned_rows']} rows for {a.rows} asked, {r['rows']} complete")


if __name__ == "__main__":
    main()
