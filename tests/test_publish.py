"""Publishing against the local test Hub (tests/hub_server.py) with the real huggingface_hub/datasets clients.

Every client runs in a subprocess: HF_ENDPOINT is read at import and HF_HUB_OFFLINE (set for the test
process) blocks even 127.0.0.1. The test Hub offers no Xet, so the subprocesses set HF_HUB_DISABLE_XET=1,
as a user of such a Hub must (one test checks the one-line error without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from datasets import Dataset
from hub_server import LocalHub
from huggingface_hub import DatasetCard, DatasetCardData

TOKEN = "hf_publishtesttoken0123456789"
FAST_SLEEP = ("import sys, time; time.sleep = lambda s: None; from magpie_hub.cli import main; "
              "main(sys.argv[1:])")  # the test harness skips backoff waits (the delays are still printed)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = LocalHub(tmp_path_factory.mktemp("hub"), token=TOKEN).start()
    yield server
    server.stop()


def hub_env(hub, **extra) -> dict[str, str]:
    # a fresh, empty HF cache per client process, beside the session's HF_HOME (conftest)
    home = tempfile.mkdtemp(prefix="hf-home-", dir=Path(os.environ["HF_HOME"]).parent)
    settings = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HOME": home,
                "COLUMNS": "200", **extra}
    return cli_env(online=True, **settings)


def write_dataset(directory: Path, tag: str, configs: dict[str, int], *, manifest: bool = False,
                  extra_files: dict[str, str] | None = None) -> dict[str, list[str]]:
    """A dataset dir in the layout of docs/architecture.md; every row names ``tag`` so versions differ.

    Configs not listed are removed. With ``manifest`` the README is the real magpie-hub card
    (``card.render_card``); otherwise a small hand-made card with configs + dataset_info.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_dir() and not old.name.startswith(".") and old.name not in configs:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    rows = {}
    for name, n in configs.items():
        instructions = [f"{tag} {name} question {i}" for i in range(n)]
        data = {"uuid": [f"{tag}-{name}-{i}" for i in range(n)], "instruction": instructions,
                "response": [f"answer {i}" for i in range(n)],
                "category": ["math" if i % 2 == 0 else "coding" for i in range(n)],
                "difficulty": ["easy" if i % 3 else "hard" for i in range(n)],
                "language": ["EN"] * n}
        (directory / name).mkdir(exist_ok=True)
        Dataset.from_dict(data).to_parquet(directory / name / "train-00000-of-00001.parquet")
        rows[name] = instructions
    for rel, text in (extra_files or {}).items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_text(text)
    if manifest:
        (directory / "magpie_manifest.json").write_text(json.dumps({"model": {"id": "tiny:llama3"}}))
        from magpie_hub.card.render import render_card

        render_card(directory)
    else:
        configs_yaml = [{"config_name": n, "data_files": [{"split": "train", "path": f"{n}/train-*.parquet"}],
                         **({"default": True} if i == 0 else {})} for i, n in enumerate(configs)]
        infos = [{"config_name": n, "splits": [{"name": "train", "num_examples": len(r)}]} for n, r in rows.items()]
        card = DatasetCard(f"---\n{DatasetCardData(configs=configs_yaml, dataset_info=infos).to_yaml()}\n---\n# t\n")
        (directory / "README.md").write_text(str(card))
    return rows


def client(hub, code: str, **extra) -> dict:
    """Run python ``code`` (which prints one JSON line last) against the hub in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", code], env=hub_env(hub, **extra), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hub_get(hub, path: str):
    """Read the Hub API directly (plain HTTP, no client import: fast)."""
    req = urllib.request.Request(hub.url + path, headers={"Authorization": f"Bearer {hub.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def state(hub, repo: str) -> dict:
    refs = hub_get(hub, f"/api/datasets/{repo}/refs")
    return {"branches": {b["name"]: b["targetCommit"] for b in refs["branches"]},
            "tags": {t["name"]: t["targetCommit"] for t in refs["tags"]},
            "commits": [c["id"] for c in hub_get(hub, f"/api/datasets/{repo}/commits/main")]}


def files_at(hub, repo: str, rev: str) -> list[str]:
    tree = hub_get(hub, f"/api/datasets/{repo}/tree/{urllib.parse.quote(rev, safe='')}?recursive=true")
    return sorted(e["path"] for e in tree if e["type"] == "file")


def publish(hub, directory: Path, repo: str, version: str, *args: str, fast: bool = False, **extra):
    env = hub_env(hub, **extra)
    if fast:
        return subprocess.run([sys.executable, "-c", FAST_SLEEP, "publish", str(directory), "--repo", repo,
                               "--version", version, *args], env=env, capture_output=True, text=True, timeout=300)
    return run_cli("publish", str(directory), "--repo", repo, "--version", version, *args, env=env)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_publish_two_versions_and_load_each_pinned(hub, tmp_path):
    repo, d = "org/roundtrip", tmp_path / "ds"
    v1 = write_dataset(d, "v1", {"single_turn": 4, "multi_turn": 3, "old_cfg": 2}, manifest=True,
                       extra_files={".magpie/checkpoint.json": "{}", ".env": f"HF_TOKEN={TOKEN}\n"})
    p1 = publish(hub, d, repo, "v1.0.0")
    assert p1.returncode == 0, p1.stderr
    assert "published org/roundtrip@v1.0.0" in p1.stdout
    v2 = write_dataset(d, "v2", {"single_turn": 5, "multi_turn": 6, "new_cfg": 1}, manifest=True)
    p2 = publish(hub, d, repo, "v1.1.0", "--message", "second release")
    assert p2.returncode == 0, p2.stderr
    for proc in (p1, p2):
        assert TOKEN not in proc.stdout + proc.stderr

    st = state(hub, repo)
    # one commit per version (after the repo's initial commit), each tagged exactly, main at the newest
    assert len(st["commits"]) == 3 and st["tags"]["v1.1.0"] == st["branches"]["main"] == st["commits"][0]
    assert st["tags"]["v1.0.0"] == st["commits"][1]
    titles = [c["title"] for c in hub_get(hub, f"/api/datasets/{repo}/commits/main")]
    assert titles == ["second release", "Publish v1.0.0", "initial commit"]
    old, new = files_at(hub, repo, "v1.0.0"), files_at(hub, repo, "v1.1.0")
    assert "old_cfg/train-00000-of-00001.parquet" in old and not any(f.startswith("old_cfg/") for f in new)
    assert "new_cfg/train-00000-of-00001.parquet" in new
    for files in (old, new):  # local state and secrets never leave the machine
        assert not any(f.startswith(".magpie") or f == ".env" for f in files)
        assert {"README.md", "magpie_manifest.json"} <= set(files)

    got = client(hub, f"""
import json
from datasets import load_dataset
from huggingface_hub import hf_hub_download
out = {{}}
for rev, configs in (("v1.0.0", {sorted(v1)!r}), ("v1.1.0", {sorted(v2)!r})):
    for cfg in configs:
        rows = list(load_dataset({repo!r}, cfg, split="train", revision=rev)["instruction"])
        streamed = [r["instruction"] for r in load_dataset({repo!r}, cfg, split="train", revision=rev,
                                                           streaming=True)]
        out[f"{{rev}}/{{cfg}}"] = [rows, streamed]
    out[f"{{rev}}/card"] = open(hf_hub_download({repo!r}, "README.md", repo_type="dataset", revision=rev)).read()
print(json.dumps(out))
""")
    for rev, rows in (("v1.0.0", v1), ("v1.1.0", v2)):
        for cfg, expected in rows.items():
            assert got[f"{rev}/{cfg}"] == [expected, expected], (rev, cfg)
        # the card was pinned to this repo and version at publish time
        assert f'"{repo}"' in got[f"{rev}/card"] and f'revision="{rev}"' in got[f"{rev}/card"]


def test_identical_republish_is_noop_and_tag_reuse_refused(hub, tmp_path):
    repo, d = "org/noop", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 3})
    assert publish(hub, d, repo, "v1.0.0").returncode == 0
    before = state(hub, repo)

    again = publish(hub, d, repo, "v1.0.0")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout and before["tags"]["v1.0.0"] in again.stdout
    assert state(hub, repo) == before

    write_dataset(d, "b", {"single_turn": 3})
    refused = publish(hub, d, repo, "v1.0.0")
    assert refused.returncode == 2
    assert len(error_lines(refused)) == 1 and "already exists" in refused.stderr and "v1.0.1" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert state(hub, repo) == before  # nothing written


def test_cut_connection_leaves_no_tag_and_rerun_completes(hub, tmp_path):
    repo, d = "org/cut", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    assert publish(hub, d, repo, "v1.0.0").returncode == 0
    before = state(hub, repo)
    write_dataset(d, "b", {"single_turn": 3, "multi_turn": 3, "third": 2})
    uploads0, dropped0 = hub.stats()["uploads"], hub.stats()["dropped"]
    hub.faults(cut_after_uploads=1)  # the network goes down once the first file is stored
    try:
        cut = publish(hub, d, repo, "v2.0.0", fast=True, MAGPIE_HUB_RETRIES="2")
    finally:
        hub.faults()
    stats = hub.stats()
    assert cut.returncode == 1, cut.stderr
    assert len(error_lines(cut)) == 1 and "re-run the same command" in cut.stderr
    assert stats["uploads"] - uploads0 >= 1 and stats["dropped"] > dropped0
    assert state(hub, repo) == before  # no tag, main unchanged

    rerun = publish(hub, d, repo, "v2.0.0")
    assert rerun.returncode == 0, rerun.stderr
    after = state(hub, repo)
    assert after["tags"]["v2.0.0"] == after["branches"]["main"] != before["branches"]["main"]
    assert len(after["commits"]) == len(before["commits"]) + 1
    assert hub.stats()["uploads"] - uploads0 == 3  # files stored before the cut were not sent again


def test_transient_errors_are_retried_with_backoff(hub, tmp_path):
    repo, d = "org/retry", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    hub.faults(fail=[{"method": "POST", "path": r"/api/datasets/org/retry/commit/", "status": 503, "count": 2},
                     {"method": "POST", "path": r"/api/datasets/org/retry/tag/", "status": 429, "count": 1,
                      "retry_after": 1}])
    try:
        proc = publish(hub, d, repo, "v1.0.0", fast=True)
    finally:
        failed = [r for r in hub.stats()["requests"] if r[2] in (429, 503) and "/org/retry/" in r[1]]
        hub.faults()
    assert proc.returncode == 0, proc.stderr
    assert len(failed) == 3
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    delays = [float(w.rsplit(" in ", 1)[1].rstrip("s")) for w in warnings]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0  # exponential backoff with jitter
    assert delays[2] >= 1.0  # the 429's Retry-After is honoured
    st = state(hub, repo)
    assert st["tags"]["v1.0.0"] == st["branches"]["main"] and len(st["commits"]) == 2


def test_commit_applied_but_answer_lost_is_not_sent_twice(hub, tmp_path):
    repo, d = "org/lost", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2, "gone": 2})
    assert publish(hub, d, repo, "v1.0.0").returncode == 0
    before = state(hub, repo)
    write_dataset(d, "b", {"single_turn": 3})  # the retry would otherwise delete gone/ a second time
    hub.faults(fail=[{"method": "POST", "path": r"/org/lost/commit/", "lose_response": True, "count": 1}])
    try:
        proc = publish(hub, d, repo, "v1.1.0", fast=True)
    finally:
        hub.faults()
    assert proc.returncode == 0, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("warning:")]) == 1
    after = state(hub, repo)
    assert len(after["commits"]) == len(before["commits"]) + 1  # one commit, recognised on retry
    assert after["tags"]["v1.1.0"] == after["branches"]["main"]
    assert not any(f.startswith("gone/") for f in files_at(hub, repo, "v1.1.0"))


def test_bad_token_one_line_no_retry_no_leak(hub, tmp_path):
    d = tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    bad = "hf_thisIsNotAValidToken987654"
    n0 = len(hub.stats()["requests"])
    proc = publish(hub, d, "org/badtoken", "v1.0.0", HF_TOKEN=bad)
    assert proc.returncode == 2
    assert error_lines(proc) == proc.stderr.strip().splitlines() and len(error_lines(proc)) == 1
    assert "401" in proc.stderr and "HF_TOKEN" in proc.stderr
    assert bad not in proc.stdout + proc.stderr
    requests = hub.stats()["requests"][n0:]
    assert [r for r in requests if r[1] == "/api/whoami-v2"] == [["GET", "/api/whoami-v2", 401]]
    assert not any(r[0] in ("POST", "PUT", "DELETE") for r in requests)


def test_token_from_dotenv(hub, tmp_path):
    d = tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    (tmp_path / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    env = hub_env(hub)
    env.pop("HF_TOKEN")
    proc = run_cli("publish", "ds", "--repo", "org/dotenv", "--version", "v0.1.0", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr


def test_dry_run_lists_operations_and_writes_nothing(hub, tmp_path):
    repo, d = "org/dry", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2, "gone": 2})
    assert publish(hub, d, repo, "v1.0.0").returncode == 0
    before = state(hub, repo)
    write_dataset(d, "b", {"single_turn": 4})
    readme = (d / "README.md").read_bytes()
    n0 = len(hub.stats()["requests"])
    proc = publish(hub, d, repo, "v1.1.0", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "upload" in out and "single_turn/train-00000-of-00001.parquet" in out
    assert "delete" in out and "gone/train-00000-of-00001.parquet" in out
    assert " B" in out or "KB" in out
    assert "nothing was written" in out
    requests = hub.stats()["requests"][n0:]
    assert requests and not any(r[0] in ("POST", "PUT", "DELETE") for r in requests)
    assert state(hub, repo) == before and (d / "README.md").read_bytes() == readme


def test_concurrent_push_fails_loudly(hub, tmp_path):
    """Someone pushes between our head read and our commit: parent_commit makes the commit fail."""
    repo, d = "org/race", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    assert publish(hub, d, repo, "v1.0.0").returncode == 0
    write_dataset(d, "b", {"single_turn": 3})
    code = f"""
import sys
import magpie_hub.hub.publish as P
from huggingface_hub import HfApi
real = P.make_plan
def racing_plan(local, remote):  # runs after publish read the head: another client commits now
    HfApi().upload_file(path_or_fileobj=b"other", path_in_repo="other.txt", repo_id={repo!r}, repo_type="dataset")
    P.make_plan = real
    return real(local, remote)
P.make_plan = racing_plan
from magpie_hub.cli import main
main(["publish", {str(d)!r}, "--repo", {repo!r}, "--version", "v1.1.0"])
"""
    proc = subprocess.run([sys.executable, "-c", code], env=hub_env(hub), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and "re-run" in proc.stderr and "changed" in proc.stderr
    st = state(hub, repo)
    assert "v1.1.0" not in st["tags"]
    assert files_at(hub, repo, "main") == sorted(files_at(hub, repo, "v1.0.0") + ["other.txt"])


def test_private_repo_and_branch(hub, tmp_path):
    repo, d = "org/private-ds", tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    proc = publish(hub, d, repo, "v1.0.0", "--private", "--branch", "release")
    assert proc.returncode == 0, proc.stderr
    st = state(hub, repo)
    assert st["tags"]["v1.0.0"] == st["branches"]["release"] != st["branches"]["main"]
    anon = client(hub, f"""
import json
from huggingface_hub import HfApi
from huggingface_hub.errors import RepositoryNotFoundError
try:
    HfApi(token=False).repo_info({repo!r}, repo_type="dataset")
    print(json.dumps("visible"))
except RepositoryNotFoundError:
    print(json.dumps("hidden"))
""")
    assert anon == "hidden"


def test_xet_needs_to_be_disabled_for_a_hub_without_xet(hub, tmp_path):
    d = tmp_path / "ds"
    write_dataset(d, "a", {"single_turn": 2})
    proc = publish(hub, d, "org/xet", "v1.0.0", HF_HUB_DISABLE_XET="0")
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "HF_HUB_DISABLE_XET=1" in proc.stderr
    assert "v1.0.0" not in state(hub, "org/xet")["tags"]


@pytest.mark.parametrize("case", ["missing", "no_readme", "no_config", "bad_version", "bad_repo"])
def test_bad_input_is_refused_before_any_network(tmp_path, case):
    from magpie_hub.errors import MagpieError
    from magpie_hub.hub.publish import publish as do_publish

    d = tmp_path / "ds"
    if case != "missing":
        write_dataset(d, "a", {"single_turn": 2})
    if case == "no_readme":
        (d / "README.md").unlink()
    if case == "no_config":
        (d / "single_turn" / "train-00000-of-00001.parquet").unlink()
    version = "1.0" if case == "bad_version" else "v1.0.0"
    repo = "no-slash" if case == "bad_repo" else "org/x"
    with pytest.raises(MagpieError) as err:  # HF_HUB_OFFLINE=1 here: any Hub call would fail differently
        do_publish(d, repo=repo, version=version)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert {"missing": "not a directory", "no_readme": "README.md", "no_config": "no config",
            "bad_version": "vX.Y.Z", "bad_repo": "ORG/NAME"}[case] in str(err.value)


def test_bad_input_cli_one_line_exit_2(tmp_path):
    proc = run_cli("publish", str(tmp_path / "nope"), "--repo", "org/x", "--version", "v1.0.0")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
