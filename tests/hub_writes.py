"""Write endpoints of the local test Hub (tests/hub_server.py): repo creation, YAML validation, preupload,
LFS batch/upload/verify, NDJSON commits (``parentCommit`` checked: 412 when stale), tags and branches.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets

import yaml
from hub_store import GITATTRIBUTES, LFS_THRESHOLD, HubFail, _entry, _now, front_matter


class WriteHandlers:
    """Mixed into the request handler; uses its ``send``/``body``/``authed``/``hub`` plumbing."""

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
