"""Storage of the local test Hub (tests/hub_server.py): repos, immutable commits, blobs, fault knobs.

``blobs/<sha256>`` holds every file body once (content addressed); ``repos/<type>/<ns>/<name>/repo.json``
holds visibility and refs (branches, tags -> commit id); ``.../commits/<id>.json`` is an immutable snapshot
(parents, message, date, and the full tree ``path -> {sha256, size, lfs, oid}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

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
