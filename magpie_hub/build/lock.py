"""One writer per dataset directory: ``DIR/.magpie/lock`` (name in :mod:`magpie_hub.layout`).

``build``, ``tag`` and ``filter`` (its input) hold it while they write or read-for-writing; a second writer
gets one line naming the holder (pid, host, command, start time) and exit 2, before it does any work.

How it is taken, safely against races and kills:

- the lock file is created with ``O_CREAT | O_EXCL`` (exactly one creator wins) and holds the holder's
  facts as JSON; where ``fcntl`` exists the holder also keeps an exclusive ``flock`` on it, which the kernel
  drops when the process dies however it dies;
- a lock that exists but whose holder is gone (its ``flock`` is free, or, without ``fcntl``, its pid is dead
  on this host) is stale: it is taken over atomically by renaming it to a unique name (one process wins
  the rename), checking that what was moved is the stale lock that was judged, and creating a new one
  with ``O_EXCL`` again;
- release removes the file (and the ``.magpie/`` folders it created, when empty).

A process may take the lock of a directory it already holds (nested stages): it is counted, not re-taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from magpie_hub.errors import LockedError, os_error
from magpie_hub.layout import TMP_DIR, lock_path

try:  # POSIX: the kernel releases an flock when its holder dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: stale locks are told by a dead pid only
    fcntl = None

_held: dict[Path, tuple[int, int]] = {}      # resolved lock path -> (fd, depth) held by this process
_created: dict[Path, list[Path]] = {}       # resolved lock path -> folders acquire() created (removed if empty)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _flock_free(path: Path) -> bool | None:
    """True when nobody holds ``path``'s flock (its holder died), False when held, None when unknown."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _stale(path: Path, holder: dict) -> bool:
    free = _flock_free(path)
    if free is not None and not holder.get("flock", True):
        free = None                    # written by a holder without flock: judge by its pid
    if free is not None:
        return free
    pid, host = holder.get("pid"), holder.get("host")
    return isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid)


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (its lock file is being written)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', 'magpie-hub')}, "
            f"started {holder.get('started_at', '?')})")


def _create(path: Path, command: str) -> int:
    """Create the lock with O_EXCL (FileExistsError when it exists) and write the holder's facts."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        facts = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                 "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "argv": " ".join(Path(sys.argv[0]).name.split()) if sys.argv else "", "flock": fcntl is not None}
        os.write(fd, (json.dumps(facts) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _take_over(path: Path, judged: dict) -> None:
    """Move the stale lock away (one process wins the rename); put back a live one moved by mistake."""
    grave = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.replace(path, grave)
    except FileNotFoundError:
        return                          # another process took it over first: try again
    moved = _read(grave)
    if moved != judged and not _stale(grave, moved):
        with contextlib.suppress(OSError):
            os.link(grave, path)        # a fresh lock replaced the stale one meanwhile: restore it
    grave.unlink(missing_ok=True)


def acquire(directory: Path | str, command: str, *, wait_s: float = 1.0, path: Path | None = None) -> Path:
    """Take ``directory``'s lock (``path``, default ``DIR/.magpie/lock``) for ``command``; LockedError naming
    the holder when another process has it. Creates ``DIR/.magpie/`` if needed (the caller decides when a
    directory may be created)."""
    path = Path(path) if path is not None else lock_path(Path(directory))
    key = path.resolve() if path.parent.exists() else path.absolute()
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        return path
    created = [p for p in (path.parent, Path(directory)) if not p.exists() and p in path.parents]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = _create(path, command)
                break
            except FileExistsError:
                holder = _read(path)
                if holder and _stale(path, holder):
                    print(f"warning: taking over a stale lock of {directory} from {_describe(holder)}: that "
                          "process is gone", file=sys.stderr)
                    _take_over(path, holder)
                    continue
                if time.monotonic() < deadline:       # a holder finishing this instant, or still writing
                    time.sleep(0.1)
                    continue
                raise LockedError(f"{directory} is being written by {_describe(holder)}",
                                  hint=f"wait for it to finish (or stop it), then re-run; if no such process "
                                       f"exists, remove {path}") from None
    except BaseException as exc:
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise os_error(exc, f"cannot lock {directory}") from None
        raise
    _held[path.resolve()] = (fd, 1)
    _created[path.resolve()] = created
    if path == lock_path(Path(directory)):   # the only writer now: staging folders left by a killed one go
        shutil.rmtree(path.parent / TMP_DIR, ignore_errors=True)
    return path


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def release(directory: Path | str, path: Path | None = None) -> None:
    path = Path(path) if path is not None else lock_path(Path(directory))
    key = path.resolve()
    if key not in _held:
        return
    fd, depth = _held.pop(key)
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)                         # after the unlink: no one can lock the old file meanwhile
    _remove_empty(_created.pop(key, []))  # the .magpie/ and DIR this lock created, if nothing else was written


@contextlib.contextmanager
def dataset_lock(directory: Path | str, command: str, path: Path | None = None) -> Iterator[Path]:
    """Hold ``directory``'s lock for the block (see :func:`acquire`)."""
    path = acquire(directory, command, path=path)
    try:
        yield path
    finally:
        release(directory, path)


def check_unlocked(directory: Path | str, command: str) -> None:
    """A reader's check, writing nothing: LockedError when a live process holds ``directory``'s lock."""
    path = lock_path(Path(directory))
    if not path.is_file() or path.resolve() in _held:
        return
    holder = _read(path)
    if holder and not _stale(path, holder):
        raise LockedError(f"cannot {command} {directory}: it is being written by {_describe(holder)}",
                          hint="wait for it to finish, then re-run")
