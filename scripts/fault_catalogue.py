"""The fault catalogue of issue 15: bad inputs and faults run against the real CLI, one subprocess each.

    python scripts/fault_catalogue.py [--only WORD] [--keep DIR]

Every case runs ``python -m magpie_hub.cli ...`` in a fresh temporary directory (tiny random-weight model,
dummy backend, tiny local HTTP servers started here, no network) and reports, as a markdown table: the exit
code, the first ``error:`` line of stderr (else its first line), whether a Python traceback was printed and
whether a secret was shown (every case runs with an OpenAI key, an ``hf auth login`` token file that does
not look like a Hub token, and a token-like recipe option; a server case echoes the Authorization header).
Disk-full cases inject ``OSError(ENOSPC)`` into the writer (a small bootstrap around the CLI), as a tmpfs
needs mount rights; permission cases use chmod and are skipped when running as root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"OPENAI_API_KEY": "catalogueOpenAIkey0042", "LOGIN": "catalogueLoginToken0042"}
RECIPE = {"name": "catalogue", "model": "tiny:llama3", "backend": "dummy", "seed": 1,
          "max_new_tokens": {"instruction": 16, "response": 16}, "concurrency": 4,
          "configs": {"a": {"rows": 3}, "b": {"rows": 2, "turns": 2}}}
FILTER = "name: f\nrules:\n  - turns >= 1\n"
INJECT = ("import errno, sys\nimport {module} as m\n"
          "def fail(*a, **k):\n    raise OSError(errno.{code}, {text!r})\n"
          "setattr({target}, {attr!r}, fail)\nfrom magpie_hub.cli import main\nmain(sys.argv[1:])\n")


# -- tiny servers -------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    mode = "ok"            # ok | 503 | echo

    def log_message(self, *args):
        pass

    def reply(self, status: int, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        routes = {"/health": {}, "/info": {"model_id": "tiny:llama3", "max_concurrent_requests": 4,
                                           "max_input_tokens": 4000, "max_total_tokens": 8000},
                  "/v1/models": {"data": [{"id": "tiny:llama3", "max_model_len": 8000}]}}
        self.reply(200 if self.path in routes else 404, routes.get(self.path, {"error": "not found"}))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/v1/"):
            self.reply(400, {"error": {"message": f"bad request; headers: Authorization={self.headers['Authorization']}"}})
        elif self.path == "/tokenize":
            self.reply(404, {})
        elif type(self).mode == "503":
            self.reply(503, {"error": "overloaded", "error_type": "overloaded"})
        else:
            self.reply(200, {"generated_text": "Tell me about rivers.", "details": {
                "finish_reason": "eos_token", "generated_tokens": 5, "prefill": [], "tokens": []}})


class Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass


def serve(mode: str) -> tuple[Quiet, str]:
    handler = type("H", (Handler,), {"mode": mode})
    server = Quiet(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# -- cases --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    group: str
    run: Callable[[Path, Path], tuple[list[str], dict[str, str]] | None]   # (work dir, built dir) -> (argv, env)


def recipe(work: Path, file: str = "r.yaml", text: str | None = None, **changes) -> Path:
    path = work / file
    if text is None:
        data = json.loads(json.dumps(RECIPE))
        data.update(changes)
        text = yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


def copy(built: Path, work: Path) -> Path:
    shutil.copytree(built, work / "d")
    return work / "d"


def manifest(d: Path, **changes) -> None:
    data = json.loads((d / "magpie_manifest.json").read_text())
    data.update(changes)
    (d / "magpie_manifest.json").write_text(json.dumps(data))


def shard(d: Path, config: str = "a") -> Path:
    return sorted((d / config).glob("*.parquet"))[0]


def truncate(d: Path) -> Path:
    p = shard(d)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return d


def drop_column(d: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(shard(d)).drop(["response"]), shard(d))
    return d


def short(d: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(shard(d)).slice(0, 1), shard(d))
    return d


def half_built(d: Path) -> Path:
    manifest(d, complete=False)
    return d


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "magpie_hub.cli", *args]


def injected(module: str, target: str, attr: str, code: str, text: str, *args: str) -> list[str]:
    return [sys.executable, "-c", INJECT.format(module=module, target=target, attr=attr, code=code, text=text),
            *args]


def filt(work: Path) -> str:
    (work / "f.yaml").write_text(FILTER)
    return str(work / "f.yaml")


def stage(name: str, d: Path, work: Path) -> list[str]:
    return {"tag": cli("tag", str(d), "--step", "lengths"),
            "filter": cli("filter", str(d), "--preset", filt(work), "--out", str(work / "out")),
            "card": cli("card", str(d)),
            "publish --dry-run": cli("publish", str(d), "--repo", "org/x", "--version", "v1.0.0", "--dry-run")}[name]


def holder(d: Path) -> subprocess.Popen:
    code = "import sys,time\nfrom magpie_hub.build.lock import acquire\nacquire(sys.argv[1],'build')\nprint('ok',flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def dead_lock(d: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / ".magpie").mkdir(exist_ok=True)
    (d / ".magpie" / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "flock": False,
                                                     "started_at": "2026-01-01T00:00:00+00:00"}))


CASES: list[Case] = []


def fill(args: tuple[str, ...], w: Path, b: Path) -> list[str]:
    """``{d}`` (a copy of the built dir), ``{f}`` (a filter file), ``{w}`` (the case dir), ``{r}`` (a recipe)."""
    text = " ".join(args)
    values = {"w": w, "d": copy(b, w) if "{d}" in text else None, "f": filt(w) if "{f}" in text else None,
              "r": recipe(w) if "{r}" in text else None}
    return [x.format(**values) for x in args]


def case(name: str, group: str):
    def add(fn):
        CASES.append(Case(name, group, fn))
        return fn
    return add


R = "name: t\nmodel: tiny:llama3\nbackend: dummy\n"
for _name, _text in [
    ("duplicate YAML key (seed twice)", R + "seed: 1\nseed: 2\nconfigs: {a: {rows: 2}}\n"),
    ("config named README.md", R + "configs: {README.md: {rows: 2}}\n"),
    ("config named magpie_manifest.json", R + "configs: {magpie_manifest.json: {rows: 2}}\n"),
    ("config named assets", R + "configs: {assets: {rows: 2}}\n"),
    ("backend_options: {batch_size: lots}", "name: t\nmodel: tiny:llama3\nbackend_options: {batch_size: lots}\n"
     "configs: {a: {rows: 2}}\n"),
    ("config rows: 10000000000", R + "configs: {a: {rows: 10000000000}}\n"),
    ("misspelled tag step (lenghts)", R + "configs: {a: {rows: 2}}\ntags: [lenghts]\n"),
    ("tag step option of the wrong type", R + "configs: {a: {rows: 2}}\ntags: [{dedup: {k: lots}}]\n"),
    ("filters need a column no step writes", R + "configs: {a: {rows: 2}}\nfilters: {rules: [difficulty >= easy]}\n"),
    ("card licence not a Hub id (apache2)", R + "configs: {a: {rows: 2}}\ncard: {license: apache2}\n"),
    ("recipe with an unknown key", R + "configs: {a: {rows: 2}}\nseeed: 3\n"),
]:
    CASES.append(Case(_name, "recipe", lambda w, b, t=_text: (cli("build", str(recipe(w, text=t)), "--out",
                                                                   str(w / "d")), {})))


@case("--rows 10000000000", "recipe")
def _(w, b):
    return cli("build", str(recipe(w)), "--rows", "10000000000", "--out", str(w / "d")), {}


@case("recipe token option shown?", "recipe")
def _(w, b):
    r = recipe(w, backend="tgi", backend_options={"endpoint": "http://127.0.0.1:9", "token": "recipeOptionSecret77"})
    return cli("build", str(r), "--out", str(w / "d")), {"_secret": "recipeOptionSecret77"}


@case("another recipe into an existing dataset (no --fresh)", "dataset")
def _(w, b):
    return cli("build", str(recipe(w, name="other", configs={"c": {"rows": 2}})), "--out", str(copy(b, w))), {}


@case("--out is a file", "recipe")
def _(w, b):
    (w / "file").write_text("x")
    return cli("build", str(recipe(w)), "--out", str(w / "file")), {}


for _stage in ("tag", "filter", "card", "publish --dry-run"):
    CASES.append(Case(f"half-built dir (build stopped) -> {_stage}", "dataset",
                      lambda w, b, s=_stage: (stage(s, half_built(copy(b, w)), w), {})))
for _damage, _label, _stages in [(truncate, "shard truncated to half", ("card", "publish --dry-run", "tag")),
                                 (drop_column, "shard missing `response`", ("tag", "publish --dry-run")),
                                 (short, "shard with fewer rows than the manifest", ("filter", "card"))]:
    for _stage in _stages:
        CASES.append(Case(f"{_label} -> {_stage}", "dataset",
                          lambda w, b, d=_damage, s=_stage: (stage(s, d(copy(b, w)), w), {})))


@case("manifest not JSON -> publish --dry-run", "dataset")
def _(w, b):
    d = copy(b, w)
    (d / "magpie_manifest.json").write_text('{"configs": {')
    return stage("publish --dry-run", d, w), {}


@case("a real failed build, then card", "dataset")
def _(w, b):
    r = recipe(w, backend_options={"error_rate": 0.95}, max_attempts=1, max_replacements=0)
    subprocess.run(cli("build", str(r), "--out", str(w / "d")), capture_output=True, env=ENV)
    return cli("card", str(w / "d")), {}


@case("second writer while a build holds the dir -> build", "lock")
def _(w, b):
    d = copy(b, w)
    HOLDERS.append(holder(d))
    return cli("build", str(recipe(w, name="catalogue")), "--out", str(d)), {}


@case("second writer while a build holds the dir -> tag", "lock")
def _(w, b):
    d = copy(b, w)
    HOLDERS.append(holder(d))
    return stage("tag", d, w), {}


@case("stale lock of a dead pid -> tag (taken over)", "lock")
def _(w, b):
    d = copy(b, w)
    dead_lock(d)
    return stage("tag", d, w), {}


@case("killed filter's hidden copy -> next filter removes it", "dataset")
def _(w, b):
    d = copy(b, w)
    (w / ".out.tmp-999999-abcd" / "a").mkdir(parents=True)
    return stage("filter", d, w), {"_gone": str(w / ".out.tmp-999999-abcd")}


@case("TGI answering 503 to every request (fail_fast_s: 2)", "remote")
def _(w, b):
    server, url = serve("503")
    SERVERS.append(server)
    r = recipe(w, backend="tgi", configs={"a": {"rows": 2}},
               backend_options={"endpoint": url, "fail_fast_s": 2, "backoff_base": 0.2, "max_retries": 1000})
    return cli("build", str(r), "--out", str(w / "d")), {}


@case("TGI serving `tiny:llama3` for a recipe naming tiny:llama3", "remote")
def _(w, b):
    server, url = serve("ok")
    SERVERS.append(server)
    r = recipe(w, backend="tgi", configs={"a": {"rows": 2}}, backend_options={"endpoint": url})
    return cli("build", str(r), "--out", str(w / "d")), {}


@case("OpenAI server echoing `Authorization=Bearer <key>`", "remote")
def _(w, b):
    server, url = serve("echo")
    SERVERS.append(server)
    r = recipe(w, backend="openai", backend_options={"endpoint": url})
    return cli("build", str(r), "--out", str(w / "d")), {}


@case("publish, token only in the login file, Hub unreachable", "remote")
def _(w, b):
    return (cli("publish", str(copy(b, w)), "--repo", "org/x", "--version", "v1.0.0"),
            {"HF_ENDPOINT": "http://127.0.0.1:9", "MAGPIE_HUB_RETRIES": "0"})


for _label, _module, _target, _attr, _args in [
    ("disk full (ENOSPC) during tag", "magpie_hub.dataset.shards", "m.pq", "write_table", ("tag", "{d}", "--step", "lengths")),
    ("disk full (ENOSPC) during filter", "magpie_hub.dataset.shards", "m.pq", "write_table",
     ("filter", "{d}", "--preset", "{f}", "--out", "{w}/out")),
    ("disk full (ENOSPC) during card", "magpie_hub.card.render", "m", "_write_validated", ("card", "{d}")),
    ("disk full (ENOSPC) during build", "magpie_hub.dataset.shards", "m.Dataset", "to_parquet",
     ("build", "{r}", "--out", "{w}/new")),
]:
    CASES.append(Case(_label, "os", lambda w, b, m=_module, t=_target, a=_attr, args=_args: (injected(
        m, t, a, "ENOSPC", "No space left on device", *fill(args, w, b)), {})))
CASES.append(Case("permission denied reading a shard during publish --dry-run", "os", lambda w, b: (injected(
    "magpie_hub.hub.publish", "m", "hash_file", "EACCES", "Permission denied", "publish", str(copy(b, w)),
    "--repo", "org/x", "--version", "v1.0.0", "--dry-run"), {})))


@case("filter --out parent not writable (chmod)", "os")
def _(w, b):
    if os.geteuid() == 0:
        return None
    d = copy(b, w)
    (w / "ro").mkdir()
    (w / "ro").chmod(0o555)
    return cli("filter", str(d), "--preset", filt(w), "--out", str(w / "ro" / "out")), {}


@case("build's .magpie/ not writable (chmod)", "os")
def _(w, b):
    if os.geteuid() == 0:
        return None
    d = copy(b, w)
    (d / ".magpie").chmod(0o555)
    return cli("build", str(recipe(w)), "--out", str(d), "--fresh"), {}


HOLDERS: list[subprocess.Popen] = []
SERVERS: list[Quiet] = []
ENV: dict[str, str] = {}


def environment(root: Path) -> dict[str, str]:
    login = root / "hf_token"
    login.write_text(SECRETS["LOGIN"] + "\n")
    env = dict(os.environ, OPENAI_API_KEY=SECRETS["OPENAI_API_KEY"], HF_TOKEN_PATH=str(login),
               HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "MAGPIE_TGI_ENDPOINT"):
        env.pop(name, None)
    return env


def first_line(stderr: str) -> str:
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    picked = next((x for x in lines if x.startswith("error:")), None) or \
        next((x for x in lines if x.startswith("warning: taking over")), lines[-1] if lines else "")
    return picked.replace("|", "\\|")[:150] + ("..." if len(picked) > 150 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the cases whose name or group contains this word")
    parser.add_argument("--keep", type=Path, help="keep the temporary directories here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fault-catalogue-", dir=args.keep))
    ENV.update(environment(root))
    selected = [c for c in CASES if not args.only or args.only in c.name or args.only == c.group]
    built = root / "built"
    if any(c.group != "recipe" for c in selected):
        subprocess.run(cli("build", str(recipe(root)), "--out", str(built)), env=ENV, check=True, cwd=root,
                       capture_output=True)
    print("| case | exit | first error line | traceback? | secret shown? |")
    print("|---|---|---|---|---|")
    try:
        for number, c in enumerate(selected, 1):
            work = root / f"case{number:02d}"
            work.mkdir()
            planned = c.run(work, built)
            if planned is None:
                print(f"| {c.name} | skipped (root ignores permissions) | | | |")
                continue
            argv, extra = planned
            secret = extra.pop("_secret", None)
            gone = extra.pop("_gone", None)
            started = time.monotonic()
            proc = subprocess.run(argv, env={**ENV, **extra}, capture_output=True, text=True, cwd=work, timeout=600)
            took = time.monotonic() - started
            out = proc.stdout + proc.stderr
            shown = any(s in out for s in (*SECRETS.values(), *([secret] if secret else [])))
            note = f" ({took:.0f}s)" if took > 20 else ""
            if gone is not None:
                note += " (leftover removed)" if not Path(gone).exists() else " (LEFTOVER KEPT)"
            print(f"| {c.name}{note} | {proc.returncode} | {first_line(proc.stderr)} | "
                  f"{'y' if 'Traceback' in proc.stderr else 'n'} | {'y' if shown else 'n'} |", flush=True)
            while HOLDERS:
                HOLDERS.pop().kill()
    finally:
        for proc in HOLDERS:
            proc.kill()
        for server in SERVERS:
            server.shutdown()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
