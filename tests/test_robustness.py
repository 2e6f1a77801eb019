"""Never publish what is not whole (issue 15): completeness, the directory lock, fail-fast against a failing
server, one redaction policy, one line for every OS failure, validation at load, the TGI model check.

Builds are the tiny random-weight model on the dummy backend (in-process, about a second each); the server
cases run the CLI in a subprocess against a tiny HTTP server started here (stdlib, in a thread).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import cli_env
from dataset_factory import make_dataset

from magpie_hub import cli, errors, pipeline
from magpie_hub.build import lock as lock_mod
from magpie_hub.dataset.verify import verify_dataset
from magpie_hub.errors import DatasetDirError, LockedError, RecipeError, redact
from magpie_hub.generate.backends.http.tgi import same_model
from magpie_hub.layout import MANIFEST, WORK_DIR, lock_path

RECIPE = {"name": "robust", "model": "tiny:llama3", "backend": "dummy", "seed": 3,
          "max_new_tokens": {"instruction": 16, "response": 16}, "concurrency": 4,
          "configs": {"a": {"rows": 3}, "b": {"rows": 2, "turns": 2}}}
ROOT = Path(__file__).resolve().parents[1]


def write_recipe(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(RECIPE))
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One whole tiny build; tests take a copy."""
    root = tmp_path_factory.mktemp("built")
    recipe = write_recipe(root / "r.yaml")
    pipeline.build(recipe, out=root / "d")
    return root / "d"


@pytest.fixture
def whole(built, tmp_path) -> Path:
    out = tmp_path / "d"
    shutil.copytree(built, out)
    return out


def set_manifest(directory: Path, **changes) -> None:
    data = json.loads((directory / MANIFEST).read_text())
    data.update(changes)
    (directory / MANIFEST).write_text(json.dumps(data))


def every_stage(directory: Path, tmp_path: Path) -> list[tuple[str, Exception | None]]:
    """Run tag, filter, card and publish --dry-run on ``directory``; what each raised."""
    spec = tmp_path / "f.yaml"
    spec.write_text("name: f\nrules:\n  - turns >= 1\n")
    calls = {
        "tag": lambda: pipeline.tag(directory, steps=["lengths"]),
        "filter": lambda: pipeline.filter(directory, preset=str(spec), out=tmp_path / "filtered"),
        "card": lambda: pipeline.card(directory),
        "publish --dry-run": lambda: pipeline.publish(directory, repo="org/name", version="v1.0.0", dry_run=True),
    }
    out = []
    for name, call in calls.items():
        try:
            call()
            out.append((name, None))
        except DatasetDirError as exc:
            out.append((name, exc))
    return out


# -- 1. completeness ----------------------------------------------------------------------------------------
def test_a_build_marks_itself_complete_only_at_its_end(whole):
    manifest = json.loads((whole / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert all(c["complete"] is True for c in manifest["configs"].values())
    assert verify_dataset(whole, action="publish", deep=True).rows == {"a": 3, "b": 2}


def test_a_failed_build_leaves_a_directory_no_stage_accepts(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", backend_options={"error_rate": 0.95}, max_attempts=1,
                          max_replacements=0, configs={"a": {"rows": 2}, "b": {"rows": 2}})
    with pytest.raises(errors.MagpieError, match="failed 1 attempts"):
        pipeline.build(recipe, out=tmp_path / "d")
    assert json.loads((tmp_path / "d" / MANIFEST).read_text())["complete"] is False
    results = every_stage(tmp_path / "d", tmp_path)
    for name, exc in results:
        assert exc is not None, f"{name} accepted a half-built directory"
        assert "did not finish" in str(exc) and "magpie-hub build" in str(exc) and "\n" not in str(exc)
    assert not (tmp_path / "filtered").exists()


def _truncate(d: Path) -> None:
    shard = sorted((d / "a").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _drop_response(d: Path) -> None:
    shard = sorted((d / "a").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(shard).drop(["response"]), shard)


def _bad_json(d: Path) -> None:
    (d / MANIFEST).write_text('{"configs": {')


def _short(d: Path) -> None:
    shard = sorted((d / "a").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(shard).slice(0, 1), shard)


def _missing_shard(d: Path) -> None:
    shard = sorted((d / "a").glob("*.parquet"))[0]
    shard.rename(shard.with_name(shard.name.replace("-of-00001", "-of-00002")))


def _config_gone(d: Path) -> None:
    shutil.rmtree(d / "b")


@pytest.mark.parametrize("damage, words", [
    (_truncate, "unreadable or truncated"), (_drop_response, "lacks the column(s) response"),
    (_bad_json, "not valid JSON"), (_short, "holds 1 rows but"), (_missing_shard, "shard is missing"),
    (_config_gone, "missing (no shards)"),
])
def test_a_damaged_directory_is_refused_by_every_stage(whole, tmp_path, damage, words):
    damage(whole)
    for name, exc in every_stage(whole, tmp_path):
        assert exc is not None, f"{name} accepted a damaged directory ({damage.__name__})"
        assert words in str(exc), (name, str(exc))
    assert not (tmp_path / "filtered").exists()


def test_directories_built_before_the_flag_are_accepted_when_their_counts_match(tmp_path):
    old = make_dataset(tmp_path / "old", sizes={"single_turn": 6, "multi_turn": 4})
    assert verify_dataset(old, action="card").legacy
    set_manifest(old, configs={"single_turn": {"rows": 7}, "multi_turn": {"rows": 4}})
    with pytest.raises(DatasetDirError, match="holds 6 rows but"):
        verify_dataset(old, action="card")


def test_publish_dry_run_of_a_half_built_directory_is_one_line_exit_2(whole, capsys):
    set_manifest(whole, complete=False)
    code, err = _main(capsys, "publish", str(whole), "--repo", "org/name", "--version", "v1.0.0", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot publish") and "did not finish" in err


# -- 2. the lock --------------------------------------------------------------------------------------------
HOLD = ("import sys, time\nfrom magpie_hub.build.lock import acquire\nacquire(sys.argv[1], 'build')\n"
        "print('held', flush=True)\ntime.sleep(60)\n")


def test_a_second_writer_is_told_who_holds_the_directory_and_a_dead_holder_is_taken_over(whole, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(whole)], stdout=subprocess.PIPE, text=True,
                              env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        for call in (lambda: pipeline.tag(whole, steps=["lengths"]),
                     lambda: lock_mod.acquire(whole, "tag", wait_s=0.2)):
            with pytest.raises(LockedError) as info:
                call()
            text = str(info.value)
            assert f"pid {holder.pid}" in text and socket.gethostname() in text and "started" in text
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            pipeline.build(whole.parent / "r.yaml" if (whole.parent / "r.yaml").exists()
                           else write_recipe(whole.parent / "r.yaml"), out=whole)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(whole).exists()                      # killed: the file stays, its flock is gone
    pipeline.tag(whole, steps=["lengths"])                # stale: taken over
    assert "taking over a stale lock" in capsys.readouterr().err
    assert not lock_path(whole).exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(whole):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(whole).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "flock": False,
                                            "started_at": "2026-01-01T00:00:00+00:00"}))
    lock_mod.acquire(whole, "tag", wait_s=0)
    try:
        assert json.loads(lock_path(whole).read_text())["pid"] == os.getpid()
    finally:
        lock_mod.release(whole)
    assert not lock_path(whole).exists()


# -- 3. fail-fast, 4. secrets from a server, 7. the TGI model check ------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    ok_left = 0
    echo_key = ""

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/info":
            self._json(200, {"model_id": "tiny:llama3", "max_concurrent_requests": 4, "max_input_tokens": 4000,
                             "max_total_tokens": 8000, "version": "test"})
        elif self.path == "/v1/models":
            self._json(200, {"data": [{"id": "tiny:llama3", "max_model_len": 8000}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        if self.path.startswith("/v1/"):      # an OpenAI-compatible server that echoes the request headers
            self._json(400, {"error": {"message": f"bad request; headers: Authorization={self.headers['Authorization']}"
                                                  f" x-api-key={cls.echo_key}"}})
        elif self.path == "/tokenize":
            self._json(404, {"error": "no"})
        elif cls.ok_left > 0:
            cls.ok_left -= 1
            self._json(200, {"generated_text": "Tell me about rivers.", "details": {
                "finish_reason": "eos_token", "generated_tokens": 5, "seed": None, "prefill": [], "tokens": []}})
        else:
            self._json(503, {"error": "overloaded", "error_type": "overloaded"})


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that hung up: not the test's business
        pass


@pytest.fixture
def server():
    handler = type("H", (_Handler,), {})
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub's offline mode (set by conftest) blocks even 127.0.0.1: lift it in process."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_every_request_failing_stops_the_build_within_the_window_and_keeps_finished_rows(server, tmp_path,
                                                                                       online, capsys):
    handler, url = server
    handler.ok_left = 2                                    # one row (instruction + response), then 503s
    recipe = write_recipe(tmp_path / "r.yaml", backend="tgi", concurrency=1, configs={"a": {"rows": 2}},
                          backend_options={"endpoint": url, "fail_fast_s": 2, "backoff_base": 0.2,
                                           "backoff_cap": 0.5, "max_retries": 1000})
    started = time.monotonic()
    code, err = _main(capsys, "build", str(recipe), "--out", str(tmp_path / "d"))
    took = time.monotonic() - started
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert code == 1 and len(lines) == 1 and err.strip().endswith(lines[0]), err[-2000:]
    assert url in lines[0] and "503" in lines[0] and "2s" in lines[0] and took < 30
    pieces = list((tmp_path / "d" / WORK_DIR / "build" / "a").glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in pieces) == 1     # the finished row stays for resume


def test_a_server_echoing_the_authorization_header_shows_no_secret(server, tmp_path, online, monkeypatch, capsys):
    handler, url = server
    key = "plainkey0without0shape77"
    handler.echo_key = key
    monkeypatch.setenv("OPENAI_API_KEY", key)
    recipe = write_recipe(tmp_path / "r.yaml", backend="openai", backend_options={"endpoint": url})
    code, err = _main(capsys, "build", str(recipe), "--out", str(tmp_path / "d"))
    last = err.strip().splitlines()[-1]       # (after the build's progress line)
    assert code == 2 and err.count("error:") == 1 and last.startswith("error:") and "Authorization=Bearer ***" in last
    assert key not in err


def test_the_tgi_model_check_compares_references_folders_and_names(tmp_path):
    def resolve(ref: str) -> str:
        return str(tmp_path / "cache" / "tiny-llama3") if ref == "tiny:llama3" else ref

    (tmp_path / "cache" / "tiny-llama3").mkdir(parents=True)
    assert same_model("tiny:llama3", "tiny:llama3", resolve)
    assert same_model("tiny:llama3", str(tmp_path / "cache" / "tiny-llama3"), resolve)
    assert same_model("meta-llama/Meta-Llama-3-8B-Instruct", "/data/Meta-Llama-3-8B-Instruct", resolve)
    assert same_model("Org/Model", "org/model", resolve)
    assert not same_model("tiny:llama3", "meta-llama/Meta-Llama-3-8B-Instruct", resolve)
    assert not same_model("a-org/Model", "b-org/Model", resolve)   # two Hub ids: the name alone is not enough


# -- 4. one redaction policy --------------------------------------------------------------------------------
def test_every_secret_source_is_redacted(tmp_path, monkeypatch, caplog):
    login = tmp_path / "token"
    login.write_text("loginTokenWithoutPrefix123\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(login))
    monkeypatch.setattr(errors, "_login_checked", False)
    (tmp_path / ".env").write_text("MY_SERVICE_API_KEY=dotenvsecretvalue9\n")
    monkeypatch.setenv("OPENAI_API_KEY", "envopenaikey42")
    errors.register_secrets_in({"backend_options": {"api_key": "recipeoptionkey7"}})
    text = ("login loginTokenWithoutPrefix123 dotenv dotenvsecretvalue9 env envopenaikey42 recipe recipeoptionkey7 "
            "echo Authorization=Bearer zzzSERVERzzz {'authorization': 'Basic dXNlcjpwYXNz'} x-api-key: qqq111")
    out = redact(text)
    for secret in ("loginTokenWithoutPrefix123", "dotenvsecretvalue9", "envopenaikey42", "recipeoptionkey7",
                   "zzzSERVERzzz", "dXNlcjpwYXNz", "qqq111"):
        assert secret not in out
    assert "max_new_tokens: 32" == redact("max_new_tokens: 32")
    errors.install_log_redaction()
    try:
        with caplog.at_level(logging.WARNING):
            logging.getLogger("magpie_hub.test").warning("server said %s", "Authorization: Bearer abcSECRET")
        assert "abcSECRET" not in caplog.text and "Bearer ***" in caplog.text
    finally:
        logging.setLogRecordFactory(logging.LogRecord)


# -- 5. one line for every OS failure -----------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _main(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    return info.value.code, capsys.readouterr().err


def test_disk_full_in_tag_filter_card_and_build_is_one_line_and_leaves_nothing(whole, tmp_path, monkeypatch, capsys):
    import magpie_hub.card.render as render
    import magpie_hub.dataset.shards as shards

    monkeypatch.setattr(shards.pq, "write_table", _enospc)
    code, err = _main(capsys, "tag", str(whole), "--step", "lengths")
    assert code == 2 and err.count("\n") == 1 and "No space left" in err and str(whole) in err
    assert "free disk space" in err and not (whole / WORK_DIR / "tmp").exists()

    spec = tmp_path / "f.yaml"
    spec.write_text("name: f\nrules:\n  - turns >= 1\n")
    code, err = _main(capsys, "filter", str(whole), "--preset", str(spec), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "No space left" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()

    monkeypatch.setattr(render, "_write_validated", _enospc)
    code, err = _main(capsys, "card", str(whole))
    assert code == 2 and err.count("\n") == 1 and "No space left" in err and str(whole) in err
    monkeypatch.undo()

    monkeypatch.setattr(shards.Dataset, "to_parquet", _enospc)
    recipe = write_recipe(tmp_path / "r2.yaml")
    code, err = _main(capsys, "build", str(recipe), "--out", str(tmp_path / "new"))
    last = err.strip().splitlines()[-1]       # (after the build's progress lines)
    assert code == 2 and err.count("error:") == 1 and "No space left" in last and "new" in last
    assert not (tmp_path / "new" / WORK_DIR / "tmp").exists() and not (tmp_path / "new" / "a").exists()
    assert json.loads((tmp_path / "new" / MANIFEST).read_text())["complete"] is False


def test_unreadable_file_in_publish_is_one_line(whole, monkeypatch, capsys):
    import magpie_hub.hub.publish as publish

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(publish, "hash_file", denied)
    code, err = _main(capsys, "publish", str(whole), "--repo", "org/name", "--version", "v1.0.0", "--dry-run")
    assert code == 2 and err.count("\n") == 1 and "Permission denied" in err and "read and write access" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied_directories_are_one_line(whole, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    spec = tmp_path / "f.yaml"
    spec.write_text("name: f\nrules:\n  - turns >= 1\n")
    parent.chmod(0o555)
    try:
        code, err = _main(capsys, "filter", str(whole), "--preset", str(spec), "--out", str(parent / "out"))
        assert code == 2 and err.count("\n") == 1 and "Permission denied" in err
        (whole / WORK_DIR).chmod(0o555)
        code, err = _main(capsys, "tag", str(whole), "--step", "lengths")
        assert code == 2 and err.count("\n") == 1 and "Permission denied" in err
    finally:
        parent.chmod(0o755)
        (whole / WORK_DIR).chmod(0o755)


def test_a_killed_filters_hidden_copy_is_removed_by_the_next_run(whole, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = [tmp_path / f".out.tmp-{dead.pid}-abcd", tmp_path / f".out.old-{dead.pid}-"]
    for path in left:
        (path / "a").mkdir(parents=True)
        (path / "a" / "train-00000-of-00001.parquet").write_bytes(b"x" * 1000)
    spec = tmp_path / "f.yaml"
    spec.write_text("name: f\nrules:\n  - turns >= 1\n")
    pipeline.filter(whole, preset=str(spec), out=tmp_path / "out")
    assert not any(p.exists() for p in left) and (tmp_path / "out" / MANIFEST).is_file()


# -- 6. validation at load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("name: t\nmodel: tiny:llama3\nseed: 1\nseed: 2\nconfigs: {a: {rows: 2}}\n", "duplicate key 'seed'"),
    ("name: t\nmodel: tiny:llama3\nconfigs: {README.md: {rows: 2}}\n", "reserved"),
    ("name: t\nmodel: tiny:llama3\nconfigs: {magpie_manifest.json: {rows: 2}}\n", "reserved"),
    ("name: t\nmodel: tiny:llama3\nconfigs: {assets: {rows: 2}}\n", "reserved"),
    ("name: t\nmodel: tiny:llama3\nconfigs: {Data: {rows: 2}}\n", "reserved"),
    ("name: t\nmodel: tiny:llama3\nbackend_options: {batch_size: lots}\nconfigs: {a: {rows: 2}}\n",
     "batch_size"),
    ("name: t\nmodel: tiny:llama3\nconfigs: {a: {rows: 10000000000}}\n", "split it"),
    ("name: t\nmodel: tiny:llama3\nbackend: dummy\nconfigs: {a: {rows: 2}}\ntags: [lenghts]\n",
     "unknown tag step 'lenghts'"),
    ("name: t\nmodel: tiny:llama3\nbackend: dummy\nconfigs: {a: {rows: 2}}\ntags: [{dedup: {k: lots}}]\n",
     "bad options"),
    ("name: t\nmodel: tiny:llama3\nbackend: dummy\nconfigs: {a: {rows: 2}}\nfilters: {rules: [difficulty >= easy]}\n",
     "add the tag step 'difficulty'"),
    ("name: t\nmodel: tiny:llama3\nbackend: dummy\nconfigs: {a: {rows: 2}}\ncard: {license: apache2}\n",
     "did you mean apache-2.0"),
])
def test_bad_recipes_are_refused_before_any_work(tmp_path, text, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as info:
        pipeline.build(recipe, out=tmp_path / "d")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "d").exists()


def test_rows_override_has_an_upper_bound(tmp_path):
    with pytest.raises(RecipeError, match="split the data"):
        pipeline.build(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "d", rows=10_000_000_000)


def test_a_directory_of_another_recipe_is_refused_without_fresh(whole, tmp_path):
    other = write_recipe(tmp_path / "o.yaml", name="other", configs={"c": {"rows": 2}})
    with pytest.raises(RecipeError, match="another recipe"):
        pipeline.build(other, out=whole)
    pipeline.build(other, out=whole, fresh=True)
    assert json.loads((whole / MANIFEST).read_text())["recipe"]["name"] == "other"

