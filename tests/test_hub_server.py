"""The local test Hub speaks the protocol of shared/reference/hub-protocol.md (plain HTTP, in-process)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import urllib.parse

import pytest
from hub_server import LocalHub

TOKEN = "hf_hubservertesttoken000000"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = LocalHub(tmp_path_factory.mktemp("hub"), token=TOKEN).start()
    yield server
    server.stop()


def call(hub, method: str, path: str, body=None, token: str | None = TOKEN, headers: dict | None = None):
    """(status, headers, parsed-or-raw body) for one request."""
    url = urllib.parse.urlsplit(hub.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body, hdrs["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw
    return resp.status, resp.headers, data


def ndjson(*items) -> bytes:
    return b"".join(json.dumps({"key": k, "value": v}).encode() + b"\n" for k, v in items)


def commit(hub, repo, files: dict[str, bytes], parent=None, branch="main", deleted=()):
    header = {"summary": "c", "description": "", **({"parentCommit": parent} if parent else {})}
    items = [("header", header)] + [("file", {"path": p, "content": base64.b64encode(c).decode(),
                                              "encoding": "base64"}) for p, c in files.items()]
    items += [("deletedFile", {"path": p}) for p in deleted]
    return call(hub, "POST", f"/api/datasets/{repo}/commit/{branch}", ndjson(*items),
                headers={"Content-Type": "application/x-ndjson"})


def new_repo(hub, name: str, private: bool = False) -> str:
    status, _, data = call(hub, "POST", "/api/repos/create",
                           {"name": name, "organization": "org", "type": "dataset", "private": private})
    assert status == 200 and data["url"].endswith(f"/datasets/org/{name}")
    return f"org/{name}"


def head(hub, repo, rev="main") -> str:
    return call(hub, "GET", f"/api/datasets/{repo}/revision/{rev}")[2]["sha"]


def test_started_and_stopped_by_pid(tmp_path):
    server = LocalHub(tmp_path / "h").start()
    info = json.loads((tmp_path / "h" / "server.json").read_text())
    assert info["pid"] == server.proc.pid and info["url"] == server.url and info["url"].startswith("http://127.0.0.1:")
    server.stop()
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(info["pid"], 0)


def test_token_checking(hub):
    assert call(hub, "GET", "/api/whoami-v2")[0] == 200
    status, headers, _ = call(hub, "GET", "/api/whoami-v2", token="hf_wrong")
    assert status == 401 and headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert call(hub, "GET", "/api/whoami-v2", token=None)[0] == 401
    assert call(hub, "POST", "/api/repos/create", {"name": "x", "type": "dataset"}, token=None)[0] == 401


def test_create_repo_conflict_and_error_codes(hub):
    repo = new_repo(hub, "codes")
    status, _, data = call(hub, "POST", "/api/repos/create", {"name": "codes", "organization": "org",
                                                               "type": "dataset"})
    assert status == 409 and data["url"].endswith("/datasets/org/codes")
    assert call(hub, "GET", "/api/datasets/org/missing")[1]["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = call(hub, "GET", f"/api/datasets/{repo}/revision/nope")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = call(hub, "HEAD", f"/datasets/{repo}/resolve/main/missing.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == head(hub, repo)
    # a new repo has the initial commit with LFS rules, as on the Hub
    status, _, data = call(hub, "GET", f"/api/datasets/{repo}/tree/main")
    assert [e["path"] for e in data] == [".gitattributes"]


def test_commits_are_immutable_snapshots_and_parent_is_checked(hub):
    repo = new_repo(hub, "snap")
    base = head(hub, repo)
    status, _, c1 = commit(hub, repo, {"a.txt": b"one", "dir/b.txt": b"bee"}, parent=base)
    assert status == 200 and len(c1["commitOid"]) == 40
    status, _, c2 = commit(hub, repo, {"a.txt": b"two"}, parent=c1["commitOid"], deleted=["dir/b.txt"])
    assert status == 200
    status, _, _ = commit(hub, repo, {"a.txt": b"three"}, parent=c1["commitOid"])  # stale parent
    assert status == 412
    assert head(hub, repo) == c2["commitOid"]
    for rev, text in ((c1["commitOid"], b"one"), (c2["commitOid"], b"two"), ("main", b"two")):
        status, headers, body = call(hub, "GET", f"/datasets/{repo}/resolve/{rev}/a.txt")
        assert status == 200 and body == text and headers["ETag"]
    assert call(hub, "HEAD", f"/datasets/{repo}/resolve/{c2['commitOid']}/dir/b.txt")[0] == 404
    status, _, data = call(hub, "GET", f"/api/datasets/{repo}/tree/{c1['commitOid']}?recursive=true")
    assert sorted((e["type"], e["path"]) for e in data) == [
        ("directory", "dir"), ("file", ".gitattributes"), ("file", "a.txt"), ("file", "dir/b.txt")]
    git_oid = hashlib.sha1(b"blob 3\0one").hexdigest()
    assert next(e for e in data if e["path"] == "a.txt")["oid"] == git_oid
    commits = call(hub, "GET", f"/api/datasets/{repo}/commits/main")[2]
    assert [c["id"] for c in commits] == [c2["commitOid"], c1["commitOid"], base]
    status, _, info = call(hub, "POST", f"/api/datasets/{repo}/paths-info/{c1['commitOid']}",
                           b"paths=a.txt&paths=nope&paths=dir&expand=false",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and sorted(e["path"] for e in info) == ["a.txt", "dir"]


def test_tags_branches_and_refs(hub):
    repo = new_repo(hub, "refs")
    sha = commit(hub, repo, {"f": b"x"})[2]["commitOid"]
    assert call(hub, "POST", f"/api/datasets/{repo}/tag/main", {"tag": "v1.0.0"})[0] == 200
    assert call(hub, "POST", f"/api/datasets/{repo}/tag/main", {"tag": "v1.0.0"})[0] == 409
    assert call(hub, "POST", f"/api/datasets/{repo}/branch/dev", {})[0] == 200
    assert call(hub, "POST", f"/api/datasets/{repo}/branch/dev", {})[0] == 409
    refs = call(hub, "GET", f"/api/datasets/{repo}/refs")[2]
    assert refs["tags"] == [{"name": "v1.0.0", "ref": "refs/tags/v1.0.0", "targetCommit": sha}]
    assert {b["name"] for b in refs["branches"]} == {"main", "dev"} and refs["converts"] == []
    commit(hub, repo, {"f": b"y"})  # moving main does not move the tag
    status, headers, body = call(hub, "GET", f"/datasets/{repo}/resolve/v1.0.0/f")
    assert body == b"x" and headers["X-Repo-Commit"] == sha
    quoted = urllib.parse.quote("refs/tags/v1.0.0", safe="")
    assert call(hub, "GET", f"/api/datasets/{repo}/revision/{quoted}")[2]["sha"] == sha
    assert call(hub, "DELETE", f"/api/datasets/{repo}/tag/v1.0.0")[0] == 200
    assert call(hub, "DELETE", f"/api/datasets/{repo}/tag/v1.0.0")[0] == 404


def test_lfs_preupload_batch_upload_verify(hub):
    repo = new_repo(hub, "lfs")
    data = b"PAR1" + bytes(range(256)) * 8 + b"PAR1"
    oid = hashlib.sha256(data).hexdigest()
    files = [{"path": "c/train-00000-of-00001.parquet", "sample": base64.b64encode(data[:512]).decode(),
              "size": len(data)},
             {"path": "README.md", "sample": base64.b64encode(b"# hi").decode(), "size": 4}]
    modes = call(hub, "POST", f"/api/datasets/{repo}/preupload/main", {"files": files})[2]["files"]
    assert {f["path"]: f["uploadMode"] for f in modes} == {"c/train-00000-of-00001.parquet": "lfs",
                                                          "README.md": "regular"}
    assert all(f["shouldIgnore"] is False for f in modes)
    batch = {"operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
             "objects": [{"oid": oid, "size": len(data)}]}
    obj = call(hub, "POST", f"/datasets/{repo}.git/info/lfs/objects/batch", batch)[2]["objects"][0]
    href = urllib.parse.urlsplit(obj["actions"]["upload"]["href"])
    put = f"{href.path}?{href.query}"
    assert call(hub, "PUT", put, data[:-1], token=None)[0] == 400  # content must match its oid
    status, _, _ = commit_lfs(hub, repo, oid, len(data))
    assert status == 422  # never uploaded
    assert call(hub, "PUT", put, data, token=None)[0] == 200
    verify = urllib.parse.urlsplit(obj["actions"]["verify"]["href"])
    assert call(hub, "POST", f"{verify.path}?{verify.query}", {"oid": oid, "size": len(data)})[0] == 200
    again = call(hub, "POST", f"/datasets/{repo}.git/info/lfs/objects/batch", batch)[2]["objects"][0]
    assert "actions" not in again  # already stored: the client skips it
    status, _, c = commit_lfs(hub, repo, oid, len(data))
    assert status == 200
    entry = call(hub, "GET", f"/api/datasets/{repo}/tree/main/c")[2][0]
    assert entry["lfs"]["oid"] == oid and entry["size"] == len(data)
    modes = call(hub, "POST", f"/api/datasets/{repo}/preupload/main", {"files": files[:1]})[2]["files"]
    assert modes[0]["oid"] == oid  # a matching remote oid lets the client skip unchanged files
    # ranges, as datasets' streaming and HfFileSystem read them
    path = f"/datasets/{repo}/resolve/{c['commitOid']}/c/train-00000-of-00001.parquet"
    status, headers, body = call(hub, "GET", path, headers={"Range": "bytes=4-9"})
    assert status == 206 and body == data[4:10] and headers["Content-Range"] == f"bytes 4-9/{len(data)}"
    assert call(hub, "GET", path, headers={"Range": "bytes=-4"})[2] == b"PAR1"
    assert call(hub, "GET", path, headers={"Range": f"bytes={len(data)}-"})[0] == 416
    status, headers, _ = call(hub, "HEAD", path)
    assert headers["ETag"] == f'"{oid}"' and int(headers["Content-Length"]) == len(data)


def commit_lfs(hub, repo, oid, size):
    body = ndjson(("header", {"summary": "lfs"}), ("lfsFile", {"path": "c/train-00000-of-00001.parquet",
                                                              "algo": "sha256", "oid": oid, "size": size}))
    return call(hub, "POST", f"/api/datasets/{repo}/commit/main", body, headers={"Content-Type": "application/x-ndjson"})


def test_private_repos_need_a_token(hub):
    repo = new_repo(hub, "secret", private=True)
    assert call(hub, "GET", f"/api/datasets/{repo}")[0] == 200
    status, headers, _ = call(hub, "GET", f"/api/datasets/{repo}", token=None)
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"


def test_validate_yaml(hub):
    ok = call(hub, "POST", "/api/validate-yaml", {"content": "---\nlicense: mit\n---\n# x", "repoType": "dataset"})
    assert ok[0] == 200 and ok[2]["errors"] == []
    bad = call(hub, "POST", "/api/validate-yaml", {"content": "---\nlicense: [mit\n---\n", "repoType": "dataset"})
    assert bad[0] == 400 and bad[2]["errors"]


def test_fault_injection_and_cut(hub):
    repo = new_repo(hub, "faults")
    hub.faults(fail=[{"method": "GET", "path": "/refs$", "status": 503, "count": 2}])
    got = [call(hub, "GET", f"/api/datasets/{repo}/refs")[0] for _ in range(3)]
    assert got == [503, 503, 200]
    hub.faults(cut_after_uploads=0)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(hub, "GET", f"/api/datasets/{repo}/refs")
    hub.faults()
    assert call(hub, "GET", f"/api/datasets/{repo}/refs")[0] == 200
    assert hub.stats()["dropped"] >= 1
