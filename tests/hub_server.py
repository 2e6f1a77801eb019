"""A small, protocol-faithful local Hugging Face Hub for the tests (stdlib only).

Run: ``python tests/hub_server.py --port 0 --data DIR [--token TOKEN]... [--user NAME]``. Once listening
it writes ``DIR/server.json`` = ``{"pid", "port", "url"}``; stop it by PID (SIGTERM).

Storage (tests/hub_store.py) under ``DIR``: ``blobs/<sha256>``, ``repos/<type>/<ns>/<name>/repo.json``
(visibility and refs: branches and tags -> commit id) and ``.../commits/<id>.json`` (immutable snapshots:
parent, message, date and the full tree ``path -> {sha256, size, lfs}``). The endpoints are exactly those
in shared/reference/hub-protocol.md; missing repos/revisions/files answer 404 with ``X-Error-Code``.
Xet is never offered (no ``xet-write-token`` endpoint, no ``X-Xet-Hash``): uploads go through LFS "basic".

Test-only endpoints (not Hub protocol): ``POST /_test/faults`` sets fault injection
``{"fail": [{"method", "path" (regex), "status" | "lose_response": true, "count", "retry_after"}],
"cut_after_uploads": N}`` (``lose_response`` applies the request, then drops the connection unanswered) and
``GET /_test/stats`` returns counters and the request log. ``cut_after_uploads: N`` drops the connection of
every request after the N-th stored LFS upload until the faults are reset (the network "goes down").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from hub_store import (
    TYPES,
    Faults,
    HubFail,
    Store,
    _pointer,
    _write_json,
    front_matter,
)
from hub_writes import WriteHandlers


class Handler(WriteHandlers, BaseHTTPRequestHandler):
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
        if getattr(self, "lose_response", False):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
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
        if action and action.get("lose_response"):  # apply the request, then drop its answer
            self.lose_response = True
        elif action:
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
