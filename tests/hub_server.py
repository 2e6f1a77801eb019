"""A small, protocol-faithful local Hugging Face Hub for the tests (stdlib only).

Run: ``python tests/hub_server.py --port 0 --data DIR [--token TOKEN]... [--user NAME]``. Once listening
it writes ``DIR/server.json`` = ``{"pid", "port", "url"}``; stop it by PID (SIGTERM).

Storage under ``DIR``: ``blobs/<sha256>`` (content addressed), ``repos/<type>/<ns>/<name>/repo.json``
(visibility and refs: branches and tags -> commit id) and ``.../commits/<id>.json`` (immutable snapshots:
parent, message, date and the full tree ``path -> {sha256, size, lfs}``). The endpoints are exactly those
in shared/reference/hub-protocol.md; missing repos/revisions/files answer 404 with ``X-Error-Code``.
Xet is never offered (no ``xet-write-token`` endpoint, no ``X-Xet-Hash``): uploads go through LFS "basic".

Test-only endpoints (not Hub protocol): ``POST /_test/faults`` sets fault injection
``{"fail": [{"method", "path" (regex), "status", "count", "retry_after"}], "cut_after_uploads": N}`` and
``GET /_test/stats`` returns counters and the request log. ``cut_after_uploads: N`` drops the connection of
every request after the N-th stored LFS upload until the faults are reset (the network "goes down").
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in ("*.parquet", "*.arrow", "*.bin", "*.safetensors", "*.pt", "*.npy", "*.gz", "*.zip",
              "*.zst", "*.tar", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.mp3", "*.wav")
)
LFS_THRESHOLD = 10 * 1024 * 1024
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class HubFail(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _entry(sha256: str, size: int, lfs: bool, data: bytes | None = None) -> dict:
    """A tree entry; ``oid`` is the git blob id (of the LFS pointer for LFS files), as on the Hub."""
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": _git_oid(_pointer(sha256, size) if lfs else data)}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def front_matter(text: str):
    """The README's YAML header as a dict (``{}`` without one); raises yaml.YAMLError when invalid."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    data = yaml.safe_load(m.group(1)) if m else {}
    if data is not None and not isinstance(data, dict):
        raise yaml.YAMLError("metadata must be a YAML mapping")
    return data or {}


class Store:
    """Repos, immutable commits and content-addressed blobs on disk; one lock serialises writes."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    # -- blobs
    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blob_path(sha).exists():
            fd, tmp = tempfile.mkstemp(dir=self.root / "blobs", prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.blob_path(sha))
        return sha

    def read(self, sha: str) -> bytes:
        return self.blob_path(sha).read_bytes()

    # -- repos
    def repo_dir(self, rtype: str, repo: str) -> Path:
        return self.root / "repos" / rtype / repo

    def repo(self, rtype: str, repo: str) -> dict | None:
        p = self.repo_dir(rtype, repo) / "repo.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save_repo(self, rtype: str, repo: str, meta: dict) -> None:
        _write_json(self.repo_dir(rtype, repo) / "repo.json", meta)

    def commit(self, rtype: str, repo: str, sha: str) -> dict | None:
        p = self.repo_dir(rtype, repo) / "commits" / f"{sha}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def new_commit(self, rtype, repo, parent, tree, title, message, author) -> str:
        body = {"parents": [parent] if parent else [], "tree": tree, "title": title, "message": message,
                "date": _now(), "authors": [author]}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode() + secrets.token_bytes(8)).hexdigest()
        _write_json(self.repo_dir(rtype, repo) / "commits" / f"{sha}.json", {"id": sha, **body})
        return sha

    def resolve(self, rtype: str, repo: str, rev: str) -> str:
        meta = self.repo(rtype, repo)
        for prefix, kind in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if rev.startswith(prefix) and rev[len(prefix):] in meta[kind]:
                return meta[kind][rev[len(prefix):]]
        if rev in meta["branches"]:
            return meta["branches"][rev]
        if rev in meta["tags"]:
            return meta["tags"][rev]
        if SHA_RE.match(rev) and self.commit(rtype, repo, rev):
            return rev
        raise HubFail(404, f"Invalid rev id: {rev}", "RevisionNotFound")


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset({})
        self.stats = {"uploads": 0, "injected": 0, "dropped": 0, "requests": []}

    def reset(self, cfg: dict) -> None:
        self.rules = [dict(r) for r in cfg.get("fail", [])]
        self.cut_after = cfg.get("cut_after_uploads")
        self.uploads_since = 0

    def check(self, method: str, path: str):
        """Return 'drop', a rule dict to fail with, or None."""
        with self.lock:
            if self.cut_after is not None and self.uploads_since >= self.cut_after:
                self.stats["dropped"] += 1
                return "drop"
            for rule in self.rules:
                if rule.get("count", 1) > 0 and rule.get("method", method) == method \
                        and re.search(rule.get("path", ""), path):
                    rule["count"] = rule.get("count", 1) - 1
                    self.stats["injected"] += 1
                    return rule
        return None

    def log(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.stats["requests"] = self.stats["requests"][-1999:] + [[method, path, status]]

    def uploaded(self) -> None:
        with self.lock:
            self.stats["uploads"] += 1
            self.uploads_since += 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "magpie-test-hub/1.0"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    # -- plumbing
    @property
    def hub(self) -> HubServer:
        return self.server  # type: ignore[return-value]

    def base(self) -> str:
        return f"http://{self.headers.get('Host', '127.0.0.1')}"

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def json_body(self):
        raw = self.body()
        return json.loads(raw) if raw else {}

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.hub.faults.log(self.command, urlsplit(self.path).path, status)

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def authed(self, required: bool) -> bool:
        tok = self.token()
        if tok is not None and tok not in self.hub.tokens:
            raise HubFail(401, "Invalid credentials in Authorization header")
        if required and tok is None:
            raise HubFail(401, "You must be authenticated to access this resource")
        return tok is not None

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        if url.path.startswith("/_test/"):
            return self.admin(url.path)
        action = self.hub.faults.check(self.command, url.path)
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action:
            self.body()
            extra = {"Retry-After": action["retry_after"]} if "retry_after" in action else {}
            return self.send(action["status"], {"error": "injected fault"}, {"X-Error-Message": "injected", **extra})
        try:
            self.route(url.path, parse_qs(url.query))
        except HubFail as e:
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self.send(e.status, {"error": e.message}, headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = dispatch

    def admin(self, path: str) -> None:
        faults = self.hub.faults
        if path == "/_test/faults" and self.command == "POST":
            with faults.lock:
                faults.reset(self.json_body())
            return self.send(200, {"ok": True})
        with faults.lock:
            stats = json.loads(json.dumps(faults.stats))
        self.send(200, stats)

    # -- routing
    def route(self, path: str, q: dict) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        m = self.command
        if parts[:2] == ["api", "whoami-v2"]:
            self.authed(True)
            return self.send(200, {"type": "user", "name": self.hub.user, "fullname": self.hub.user,
                                   "orgs": [], "auth": {"type": "access_token",
                                                        "accessToken": {"displayName": "test", "role": "write"}}})
        if parts[:3] == ["api", "repos", "create"] and m == "POST":
            return self.create_repo(self.json_body())
        if parts[:2] == ["api", "validate-yaml"] and m == "POST":
            return self.validate_yaml(self.json_body())
        if parts[0] == "_lfs":
            return self.lfs_object(parts[1], q, verify=len(parts) > 2)
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in TYPES:
            rtype, repo, rest = TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            meta = self.repo_or_404(rtype, repo)
            return self.repo_api(rtype, repo, meta, rest, q)
        rtype = TYPES.get(parts[0], "model")
        if rtype != "model":
            parts = parts[1:]
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo = f"{parts[0]}/{parts[1][:-4]}"
            return self.lfs_batch(rtype, repo, self.repo_or_404(rtype, repo, write=True))
        if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
            repo = f"{parts[0]}/{parts[1]}"
            meta = self.repo_or_404(rtype, repo)
            return self.resolve_file(rtype, repo, parts[3], "/".join(parts[4:]))
        raise HubFail(404, "Not Found")

    def repo_or_404(self, rtype: str, repo: str, write: bool = False) -> dict:
        authed = self.authed(write)
        meta = self.hub.store.repo(rtype, repo)
        if meta is None or (meta["private"] and not authed):
            raise HubFail(404 if meta is None else 401, "Repository not found", "RepoNotFound")
        return meta

    def repo_api(self, rtype: str, repo: str, meta: dict, rest: list[str], q: dict) -> None:
        store, m = self.hub.store, self.command
        sub = rest[0] if rest else ""
        if sub in ("", "revision") and m == "GET":
            sha = store.resolve(rtype, repo, rest[1] if sub else "main")
            return self.send(200, self.repo_info(rtype, repo, meta, sha))
        if sub == "refs":
            refs = {kind: [{"name": n, "ref": f"refs/{'heads' if kind == 'branches' else 'tags'}/{n}",
                            "targetCommit": c} for n, c in sorted(meta[kind].items())]
                    for kind in ("branches", "tags")}
            return self.send(200, {**refs, "converts": [], **({"pullRequests": []} if q.get("include_prs") else {})})
        if sub == "tree":
            sha = store.resolve(rtype, repo, rest[1])
            recursive = q.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self.send(200, self.tree(rtype, repo, sha, "/".join(rest[2:]).strip("/"), recursive,
                                            q.get("expand", ["false"])[0].lower() in ("1", "true")))
        if sub == "paths-info" and m == "POST":
            sha = store.resolve(rtype, repo, rest[1])
            raw = self.body().decode()
            form = json.loads(raw) if raw.startswith("{") else parse_qs(raw)
            paths = form.get("paths", [])
            entries = self.entries(rtype, repo, sha)
            return self.send(200, [entries[p.strip("/")] for p in paths if p.strip("/") in entries])
        if sub == "commits" and m == "GET":
            out, sha = [], store.resolve(rtype, repo, rest[1])
            while sha:
                c = store.commit(rtype, repo, sha)
                out.append({"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": a} for a in c["authors"]]})
                sha = c["parents"][0] if c["parents"] else None
            return self.send(200, out)
        self.authed(True)  # everything below writes
        if sub == "preupload" and m == "POST":
            return self.preupload(rtype, repo, rest[1], self.json_body())
        if sub == "commit" and m == "POST":
            return self.commit(rtype, repo, rest[1], q)
        if sub in ("tag", "branch") and m in ("POST", "DELETE"):
            return self.ref(rtype, repo, sub, rest[1])
        raise HubFail(404, "Not Found")

    # -- reads
    def entries(self, rtype: str, repo: str, sha: str) -> dict[str, dict]:
        """Every file and directory of a commit as Hub tree entries, keyed by path."""
        tree = self.hub.store.commit(rtype, repo, sha)["tree"]
        out: dict[str, dict] = {}
        for path, f in sorted(tree.items()):
            out[path] = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
            if f["lfs"]:
                out[path]["lfs"] = {"oid": f["sha256"], "size": f["size"],
                                    "pointerSize": len(_pointer(f["sha256"], f["size"]))}
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                out.setdefault(d, {"type": "directory", "path": d, "size": 0, "oid": ""})
        for d, e in out.items():
            if e["type"] == "directory":
                kids = "".join(f"{p}:{x['oid']}" for p, x in out.items() if p.startswith(d + "/"))
                e["oid"] = hashlib.sha1(kids.encode()).hexdigest()
        return out

    def tree(self, rtype, repo, sha, path, recursive, expand) -> list[dict]:
        entries = self.entries(rtype, repo, sha)
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubFail(404, f"Entry not found: {path}", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        out = [e for p, e in entries.items() if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        if expand:
            for e in out:
                e["lastCommit"] = self.last_commit(rtype, repo, sha, e["path"])
        return out

    def last_commit(self, rtype, repo, sha, path) -> dict:
        store = self.hub.store
        c = store.commit(rtype, repo, sha)

        def state(commit):
            return {p: f["sha256"] for p, f in commit["tree"].items() if p == path or p.startswith(path + "/")}

        while c["parents"]:
            parent = store.commit(rtype, repo, c["parents"][0])
            if state(parent) != state(c):
                break
            c = parent
        return {"id": c["id"], "title": c["title"], "date": c["date"]}

    def repo_info(self, rtype, repo, meta, sha) -> dict:
        store = self.hub.store
        commit = store.commit(rtype, repo, sha)
        siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"],
                     **({"lfs": {"sha256": e["lfs"]["oid"], "size": e["size"],
                                 "pointerSize": e["lfs"]["pointerSize"]}} if "lfs" in e else {})}
                    for e in self.entries(rtype, repo, sha).values() if e["type"] == "file"]
        card = {}
        if "README.md" in commit["tree"]:
            try:
                card = front_matter(store.read(commit["tree"]["README.md"]["sha256"]).decode())
            except (yaml.YAMLError, UnicodeDecodeError):
                card = {}
        return {"id": repo, "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "author": repo.split("/")[0],
                "sha": sha, "private": meta["private"], "gated": False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "createdAt": meta["createdAt"], "lastModified": commit["date"],
                "cardData": card, "siblings": siblings,
                "usedStorage": sum(f["size"] for f in commit["tree"].values())}

    def resolve_file(self, rtype: str, repo: str, rev: str, path: str) -> None:
        store = self.hub.store
        sha = store.resolve(rtype, repo, rev)
        f = store.commit(rtype, repo, sha)["tree"].get(path)
        if f is None:
            raise HubFail(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        etag = f["sha256"] if f["lfs"] else f["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": f["size"]})
        size, start, end = f["size"], 0, f["size"] - 1
        rng = re.match(r"bytes=(\d*)-(\d*)$", self.headers.get("Range", ""))
        status = 200
        if rng and (rng.group(1) or rng.group(2)):
            if rng.group(1):
                start, end = int(rng.group(1)), min(int(rng.group(2) or size - 1), size - 1)
            else:
                start = max(size - int(rng.group(2)), 0)
            if start >= size:
                return self.send(416, {"error": "Range Not Satisfiable"}, {"Content-Range": f"bytes */{size}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.hub.faults.log(self.command, urlsplit(self.path).path, status)
        if self.command == "GET":
            with open(store.blob_path(f["sha256"]), "rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = fh.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)

    # -- writes
    def create_repo(self, req: dict) -> None:
        self.authed(True)
        rtype = req.get("type") or "model"
        repo = f"{req.get('organization') or self.hub.user}/{req['name']}"
        url = f"{self.base()}/{'' if rtype == 'model' else rtype + 's/'}{repo}"
        store = self.hub.store
        with store.lock:
            if store.repo(rtype, repo) is not None:
                return self.send(409, {"error": f"You already created this {rtype} repo", "url": url},
                                 {"X-Error-Message": f"You already created this {rtype} repo"})
            private = bool(req.get("private")) or req.get("visibility") == "private"
            data = GITATTRIBUTES.encode()
            sha = store.new_commit(rtype, repo, None, {".gitattributes": _entry(store.put_bytes(data), len(data),
                                                                                False, data)},
                                   "initial commit", "", self.hub.user)
            store.save_repo(rtype, repo, {"private": private, "createdAt": _now(),
                                          "branches": {"main": sha}, "tags": {}})
        self.send(200, {"url": url, "name": repo, "id": hashlib.md5(repo.encode()).hexdigest()[:24]})

    def validate_yaml(self, req: dict) -> None:
        try:
            meta = front_matter(req.get("content", ""))
            configs = meta.get("configs", [])
            if not isinstance(configs, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("config_name"), str) for c in configs):
                raise yaml.YAMLError('"configs" must be a list of mappings with a "config_name"')
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            return self.send(400, {"errors": [{"message": msg}], "warnings": []}, {"X-Error-Message": msg[:200]})
        self.send(200, {"errors": [], "warnings": [] if meta else [{"message": "Empty metadata"}]})

    def preupload(self, rtype: str, repo: str, rev: str, req: dict) -> None:
        store = self.hub.store
        tree = store.commit(rtype, repo, store.resolve(rtype, repo, rev))["tree"]
        patterns = []
        if ".gitattributes" in tree:
            for line in store.read(tree[".gitattributes"]["sha256"]).decode().splitlines():
                if "filter=lfs" in line:
                    patterns.append(line.split()[0])
        files = []
        for f in req.get("files", []):
            path, sample = f["path"], base64.b64decode(f.get("sample", ""))
            name = path.rsplit("/", 1)[-1]
            lfs = (f.get("size", 0) >= LFS_THRESHOLD or b"\0" in sample
                   or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns))
            cur = tree.get(path)
            oid = None if cur is None else (cur["sha256"] if cur["lfs"] else cur["oid"])
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": path.startswith(".git/"), **({"oid": oid} if oid else {})})
        self.send(200, {"files": files})

    def lfs_batch(self, rtype: str, repo: str, meta: dict) -> None:
        req, out = self.json_body(), []
        for obj in req.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size}
            if not self.hub.store.blob_path(oid).exists():
                ticket = secrets.token_hex(16)
                self.hub.tickets[ticket] = (oid, size)
                href = f"{self.base()}/_lfs/{oid}?ticket={ticket}"
                entry["actions"] = {"upload": {"href": href},
                                    "verify": {"href": f"{self.base()}/_lfs/{oid}/verify?ticket={ticket}"}}
            out.append(entry)
        self.send(200, {"transfer": "basic", "objects": out, "hash_algo": "sha256"})

    def lfs_object(self, oid: str, q: dict, verify: bool) -> None:
        ticket = q.get("ticket", [""])[0]
        if self.hub.tickets.get(ticket, (None,))[0] != oid:
            self.body()
            raise HubFail(403, "invalid or expired upload ticket")
        store = self.hub.store
        if verify:
            req = self.json_body()
            ok = store.blob_path(oid).exists() and store.blob_path(oid).stat().st_size == int(req.get("size", -1))
            return self.send(200 if ok else 404, {"ok": ok} if ok else {"error": "object not found"})
        data = self.body()  # stored only if complete and matching its oid
        if hashlib.sha256(data).hexdigest() != oid or len(data) != self.hub.tickets[ticket][1]:
            raise HubFail(400, "uploaded content does not match its oid/size")
        store.put_bytes(data)
        self.hub.faults.uploaded()
        self.send(200, {})

    def commit(self, rtype: str, repo: str, branch: str, q: dict) -> None:
        if q.get("create_pr"):
            self.body()
            raise HubFail(400, "pull requests are not supported by this test hub")
        lines = [json.loads(x) for x in self.body().splitlines() if x.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubFail(400, "commit header with a summary is required")
        store = self.hub.store
        with store.lock:
            meta = store.repo(rtype, repo)
            if branch not in meta["branches"]:
                raise HubFail(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = meta["branches"][branch]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubFail(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(store.commit(rtype, repo, head)["tree"])
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "file":
                    data = base64.b64decode(v["content"])
                    tree[v["path"]] = _entry(store.put_bytes(data), len(data), False, data)
                elif key == "lfsFile":
                    if not store.blob_path(v["oid"]).exists():
                        raise HubFail(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                    tree[v["path"]] = _entry(v["oid"], store.blob_path(v["oid"]).stat().st_size, True)
                elif key == "deletedFile":
                    if tree.pop(v["path"], None) is None:
                        raise HubFail(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    tree = {p: f for p, f in tree.items() if not p.startswith(prefix)}
            sha = store.new_commit(rtype, repo, head, tree, header["summary"], header.get("description", ""),
                                   self.hub.user)
            meta["branches"][branch] = sha
            store.save_repo(rtype, repo, meta)
        prefix = "" if rtype == "model" else f"{rtype}s/"
        self.send(200, {"success": True, "commitOid": sha,
                        "commitUrl": f"{self.base()}/{prefix}{repo}/commit/{sha}"})

    def ref(self, rtype: str, repo: str, kind: str, name: str) -> None:
        store, req = self.hub.store, self.json_body()
        key = "tags" if kind == "tag" else "branches"
        with store.lock:
            meta = store.repo(rtype, repo)
            if self.command == "DELETE":
                if name not in meta[key]:
                    raise HubFail(404, f"{kind} {name} not found", "RevisionNotFound")
                if key == "branches" and name == "main":
                    raise HubFail(403, "the main branch cannot be deleted")
                del meta[key][name]
            else:
                new = req.get("tag") if kind == "tag" else name
                target = store.resolve(rtype, repo, name if kind == "tag" else req.get("startingPoint") or "main")
                if new in meta[key]:
                    raise HubFail(409, f"{kind} {new} already exists")
                meta[key][new] = target
            store.save_repo(rtype, repo, meta)
        self.send(200, {})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, data: Path, tokens: list[str], user: str):
        super().__init__(addr, Handler)
        self.store, self.tokens, self.user = Store(data), set(tokens), user
        self.faults, self.tickets = Faults(), {}


class LocalHub:
    """The tests' handle on a server subprocess: started on a free port on 127.0.0.1, stopped by PID."""

    def __init__(self, data: Path, token: str = "hf_localtesthubtoken0000", user: str = "tester"):
        self.data, self.token, self.user = Path(data), token, user
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> LocalHub:
        info = self.data / "server.json"
        info.unlink(missing_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", "0", "--data", str(self.data),
                                      "--token", self.token, "--user", self.user])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if info.exists() and json.loads(info.read_text())["pid"] == self.proc.pid:
                self.url = json.loads(info.read_text())["url"]
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("local hub did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)

    def _call(self, path: str, payload: dict | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=10) as r:
            return json.loads(r.read())

    def faults(self, **cfg) -> None:
        """Replace the fault configuration (no arguments: clear every fault)."""
        self._call("/_test/faults", cfg)

    def stats(self) -> dict:
        return self._call("/_test/stats")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--token", action="append", default=[], help="a valid token (repeatable)")
    ap.add_argument("--user", default="tester")
    args = ap.parse_args()
    server = HubServer((args.host, args.port), args.data, args.token or ["hf_localtesthubtoken0000"], args.user)
    port = server.server_address[1]
    _write_json(args.data / "server.json", {"pid": os.getpid(), "port": port, "url": f"http://{args.host}:{port}"})
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
