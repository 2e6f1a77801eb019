"""Versioned publishing: each version is ONE commit on a branch plus a tag on exactly that commit.

``publish(DIR, repo, version)``:

1. checks DIR is whole (:func:`magpie_hub.dataset.verify.verify_dataset`, every row read: a half-built,
   truncated or column-missing directory is refused, dry run too), has a README.md card, the version
   (``vX.Y.Z``) and the token (:mod:`magpie_hub.hub.client`); creates the dataset repo if missing;
2. if the tag exists: identical content -> a no-op naming its commit; different content -> refused
   (tags are immutable, exit 2);
3. re-renders a magpie-hub card (DIR has ``magpie_manifest.json``) so its loading snippet is pinned to
   ``repo`` / ``version`` (hand-made READMEs are uploaded as they are);
4. reads the branch head, plans the operations against it (every file except hidden paths such as
   ``.magpie/`` and ``.env``; unchanged files are skipped; files of the head that are gone locally are
   deleted, except ``.gitattributes``), then ONE ``create_commit`` with ``parent_commit`` = that head,
   so a concurrent push fails loudly (412) instead of interleaving;
5. ``create_tag`` on exactly the new commit.

Just before the commit the collected files are checked again against what was verified (same shards, same
sizes, sha256 taken again): a directory that changed meanwhile is refused. A dry run that cannot reach the
Hub fails (exit 1) instead of reporting a plan it could not compare.

Transient failures are retried (:func:`magpie_hub.hub.client.call`); a publish cut at any point leaves no
tag and the branch unchanged, and re-running it completes (uploaded LFS objects are skipped). Files are
passed to huggingface_hub as paths: memory stays flat in the dataset size; uploads show its progress bar.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from magpie_hub import __version__
from magpie_hub.dataset.verify import Verified, unchanged_since, verify_dataset
from magpie_hub.errors import DatasetDirError, HubError
from magpie_hub.hub.client import HubUnavailableError, call, hub_api, resolve_token
from magpie_hub.layout import MANIFEST, README, REPO_RE, SPLIT, VERSION_RE, config_names
from magpie_hub.retry import http_status

KEEP_REMOTE = frozenset({".gitattributes"})  # the repo's LFS rules: never deleted
REPO_TYPE = "dataset"
_CHUNK = 1 << 20


class TagConflictError(HubError):
    """The version tag exists with other content (tags are immutable)."""


@dataclass(frozen=True)
class LocalFile:
    path: str          # path in the repo (posix)
    local: Path
    size: int
    sha256: str
    git_oid: str       # git blob id, what the Hub reports for regular (non-LFS) files


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    oid: str
    sha256: str | None  # set for LFS files


@dataclass
class Plan:
    upload: list[LocalFile] = field(default_factory=list)     # new or changed
    unchanged: list[LocalFile] = field(default_factory=list)
    delete: list[RemoteFile] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.upload and not self.delete

    def summary(self) -> str:
        return f"{len(self.upload)} to upload, {len(self.unchanged)} unchanged, {len(self.delete)} to delete"


@dataclass
class PublishResult:
    repo: str
    version: str
    commit: str | None
    status: str        # published | tagged | unchanged | dry-run
    plan: Plan


def hash_file(path: Path) -> tuple[str, str, int]:
    """(sha256, git blob oid, size) in one streaming pass."""
    size = path.stat().st_size
    sha, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest(), size


def collect(directory: Path) -> list[LocalFile]:
    """Every file to publish: all of DIR except hidden paths (``.magpie/`` state, ``.env``, caches)."""
    out = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        sha, git, size = hash_file(p)
        out.append(LocalFile(rel.as_posix(), p, size, sha, git))
    return out


def same(local: LocalFile, remote: RemoteFile) -> bool:
    return local.sha256 == remote.sha256 if remote.sha256 else local.git_oid == remote.oid


def make_plan(local: list[LocalFile], remote: dict[str, RemoteFile]) -> Plan:
    plan = Plan()
    for f in local:
        r = remote.get(f.path)
        (plan.unchanged if r is not None and same(f, r) else plan.upload).append(f)
    names = {f.path for f in local}
    plan.delete = [r for p, r in sorted(remote.items()) if p not in names and p not in KEEP_REMOTE]
    return plan


def remote_files(api, repo: str, revision: str) -> dict[str, RemoteFile]:
    def listing():
        return list(api.list_repo_tree(repo, repo_type=REPO_TYPE, revision=revision, recursive=True))

    out = {}
    for e in call(f"listing {repo}@{revision[:12]}", repo, listing):
        if hasattr(e, "blob_id"):  # RepoFile (folders have no blob id)
            out[e.path] = RemoteFile(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs else None)
    return out


def check_inputs(directory: Path, repo: str, version: str) -> None:
    if not REPO_RE.match(repo or ""):
        raise HubError(f"--repo {repo!r} is not ORG/NAME (e.g. my-org/magpie-pro)")
    if not VERSION_RE.match(version or ""):
        raise HubError(f"--version {version!r} is not vX.Y.Z (e.g. v1.0.0)")
    if not directory.is_dir():
        raise DatasetDirError(f"{directory} is not a directory; give the dataset directory written by "
                              f"`magpie-hub build`")
    if not config_names(directory):
        raise DatasetDirError(f"{directory} has no config ({{config}}/{SPLIT}-*.parquet); build it first with "
                              f"`magpie-hub build`")
    if not (directory / README).is_file():
        raise DatasetDirError(f"{directory} has no {README}; render the card with `magpie-hub card {directory}`")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_plan(console: Console, plan: Plan, title: str) -> None:
    table = Table(title=title)
    table.add_column("operation")
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right")
    for f in plan.upload:
        table.add_row("upload", f.path, _size(f.size))
    for f in plan.unchanged:
        table.add_row("unchanged", f.path, _size(f.size))
    for r in plan.delete:
        table.add_row("delete", r.path, _size(r.size))
    console.print(table)
    console.print(f"{plan.summary()}; {_size(sum(f.size for f in plan.upload))} to upload")


def _refs(api, repo: str) -> tuple[dict[str, str], dict[str, str]]:
    refs = call(f"reading the refs of {repo}", repo, api.list_repo_refs, repo, repo_type=REPO_TYPE)
    return ({b.name: b.target_commit for b in refs.branches}, {t.name: t.target_commit for t in refs.tags})


def _refuse_or_noop(api, repo: str, version: str, commit: str, local: list[LocalFile]) -> Plan:
    plan = make_plan(local, remote_files(api, repo, commit))
    if plan.identical:
        return plan
    changed = ", ".join([f.path for f in plan.upload][:3] + [r.path for r in plan.delete][:2])
    major, minor, patch = (int(x) for x in VERSION_RE.match(version).groups())
    raise TagConflictError(f"{repo}@{version} already exists (commit {commit[:12]}) with different content ({changed}"
                   f"{', ...' if len(plan.upload) + len(plan.delete) > 5 else ''}); tags are immutable: publish "
                   f"it as a new version, e.g. --version v{major}.{minor}.{patch + 1}")


def _commit(api, repo: str, branch: str, head: str, plan: Plan, message: str, description: str,
            local: list[LocalFile]) -> str:
    """ONE create_commit on top of ``head``. Before a retry, a commit that landed although its answer was
    lost is recognised (the branch moved to exactly this content) instead of being sent again."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    tries = 0

    def attempt() -> str:
        nonlocal tries
        tries += 1
        if tries > 1:
            now = _refs(api, repo)[0].get(branch)
            if now and now != head and make_plan(local, remote_files(api, repo, now)).identical:
                return now
        ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.local)) for f in plan.upload]
        ops += [CommitOperationDelete(path_in_repo=r.path) for r in plan.delete]
        info = api.create_commit(repo, ops, commit_message=message, commit_description=description,
                                 repo_type=REPO_TYPE, revision=branch, parent_commit=head)
        return info.oid

    return call(f"committing to {repo}@{branch}", repo, attempt)


def _tag(api, repo: str, version: str, commit: str) -> None:
    def attempt() -> None:
        try:
            api.create_tag(repo, tag=version, revision=commit, repo_type=REPO_TYPE, tag_message=f"{repo} {version}")
        except Exception as exc:
            if http_status(exc) != 409:
                raise
            target = _refs(api, repo)[1].get(version)  # e.g. a retried request whose first answer was lost
            if target != commit:
                raise HubError(f"tag {version} was just created on {str(target)[:12]} by someone else; "
                               f"check `magpie-hub versions {repo}`") from None

    call(f"tagging {repo}@{commit[:12]} as {version}", repo, attempt)


def publish(directory: Path | str, repo: str, version: str, private: bool = False, branch: str = "main",
            message: str | None = None, dry_run: bool = False, console: Console | None = None,
            pin: Callable[[Path, str, str], bool] | None = None) -> PublishResult:
    """Publish DIR to the Hub dataset ``repo`` as one commit on ``branch`` tagged ``version``.

    ``pin(directory, repo, version)`` (given by the pipeline) re-renders the card with its loading snippet
    pinned to this version just before the files are collected, only when the tag is new; True if it did."""
    directory = Path(directory)
    console = console or Console(highlight=False)
    if directory.is_dir():
        verified = verify_dataset(directory, action="publish", deep=True)   # whole, every row readable
    check_inputs(directory, repo, version)
    token = resolve_token()
    if dry_run:
        return _dry_run(directory, repo, version, branch, token, console, verified)
    if not token:
        raise HubError("no Hub token: set HF_TOKEN (environment or ./.env) or run `hf auth login`")
    api = hub_api(token)
    call("checking the Hub token", repo, api.whoami)
    call(f"creating {repo}", repo, api.create_repo, repo, repo_type=REPO_TYPE, private=private, exist_ok=True)
    branches, tags = _refs(api, repo)
    if version in tags:
        plan = _refuse_or_noop(api, repo, version, tags[version], collect(directory))
        console.print(f"{repo}@{version} is already published as commit {tags[version]} with identical "
                      f"content: nothing to do")
        return PublishResult(repo, version, tags[version], "unchanged", plan)
    if branch not in branches:
        call(f"creating branch {branch}", repo, api.create_branch, repo, branch=branch, repo_type=REPO_TYPE,
             exist_ok=True)
        branches = _refs(api, repo)[0]
    if pin is not None and pin(directory, repo, version):
        console.print(f"card {README} pinned to {repo}@{version}")
    local = collect(directory)
    recheck(verified, local)
    head = branches[branch]
    plan = make_plan(local, remote_files(api, repo, head))
    print_plan(console, plan, f"{repo}@{branch} (head {head[:12]}) -> {version}")
    if plan.identical:
        commit, status = head, "tagged"
        console.print(f"{branch} head {head[:12]} already holds exactly this content: tagging it")
    else:
        description = (f"Published with magpie-hub {__version__}: {plan.summary()}.\n\n"
                       f"Load it: load_dataset({repo!r}, CONFIG, revision={version!r})")
        commit = _commit(api, repo, branch, head, plan, message or f"Publish {version}", description, local)
        status = "published"
    _tag(api, repo, version, commit)
    configs = config_names(directory)
    console.print(f"{status} {repo}@{version} = commit {commit}")
    console.print(f"load it: load_dataset({repo!r}, {configs[0]!r}, revision={version!r})")
    return PublishResult(repo, version, commit, status, plan)


def recheck(verified: Verified, local: list[LocalFile]) -> None:
    """What is uploaded is what was verified: same shards, same sizes, and each file's bytes unchanged
    between hashing and now (sizes and sha256 taken again just before the commit)."""
    unchanged_since(verified, {f.local: f.size for f in local})
    for f in local:
        if f.local in verified.shards and hash_file(f.local)[0] != f.sha256:
            raise DatasetDirError(f"{f.local} changed while it was being published",
                                  hint="wait for the command writing the directory to finish and re-run publish")


def _dry_run(directory: Path, repo: str, version: str, branch: str, token: str | None,
             console: Console, verified: Verified) -> PublishResult:
    """Print every operation and size; read the Hub when possible, write nothing (not even the card)."""
    local, remote, head, note = collect(directory), {}, None, ""
    recheck(verified, local)
    try:
        api = hub_api(token)
        branches, tags = _refs(api, repo)
        if version in tags:
            plan = _refuse_or_noop(api, repo, version, tags[version], local)
            console.print(f"dry run: {repo}@{version} is already published as commit {tags[version]} with "
                          f"identical content: publish would do nothing")
            return PublishResult(repo, version, tags[version], "dry-run", plan)
        head = branches.get(branch) or branches.get("main")
        remote = remote_files(api, repo, head) if head else {}
    except (TagConflictError, HubUnavailableError):
        raise        # a Hub that cannot be reached: the dry run cannot say what publish would do (exit 1)
    except HubError as exc:
        note = f" (could not read {repo}: {exc}; planned against an empty repo)"
    plan = make_plan(local, remote)
    print_plan(console, plan, f"dry run: {repo}@{branch} (head {head[:12] if head else 'new repo'}) -> {version}")
    if (directory / MANIFEST).is_file():
        console.print(f"{README} would be re-rendered with its loading snippet pinned to {repo}@{version}")
    console.print(f"would make 1 commit on {branch} and tag it {version}; nothing was written{note}")
    return PublishResult(repo, version, None, "dry-run", plan)
