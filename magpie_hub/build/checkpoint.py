"""Build checkpoints: append-only JSONL pieces under ``DIR/.magpie/build/{config}/``.

Every process of every run opens its own piece ``rows-r{rank}-{token}.jsonl`` and appends one line per
finished conversation (``{"i": index, "u": uuid, "k": replacement, "t": tokens, "r": row}``; ``k`` > 0 when
the row's own spec and k - 1 replacements exhausted their attempts, ``t`` the tokens of its turns) and one
line per exhausted spec (``{"i": index, "u": uuid, "k": k, "x": 1}``, so a resume goes on with the next
replacement), flushed at once and fsync'ed at least every ``fsync_s`` seconds, so ``kill -9`` at any moment
loses at most the line being written: a torn last line (no newline, or not JSON) is ignored when reading. A side file ``....stats.json`` (atomically replaced)
carries the piece's drop counts, tokens and wall time, so the manifest's counts add up over resumed runs.
``fingerprint.json`` records what the rows depend on (:meth:`Recipe.generation_settings`); a resume with
a different recipe is refused by the builder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magpie_hub.dataset.directory import atomic_write_text
from magpie_hub.layout import WORK_DIR

PIECE_GLOB = "rows-*.jsonl"


def build_state_dir(out: Path, config: str) -> Path:
    return Path(out, WORK_DIR, "build", config)


@dataclass
class ScanResult:
    """Where each finished row of a config lives: index -> (piece path, byte offset, byte length); its
    replacement number and tokens; and, per unfinished index, the last exhausted replacement number."""

    locations: dict[int, tuple[Path, int, int]] = field(default_factory=dict)
    replacements: dict[int, int] = field(default_factory=dict)   # index -> k of its row (k > 0 only)
    tokens: dict[int, int] = field(default_factory=dict)         # index -> tokens of its row's turns
    exhausted: dict[int, int] = field(default_factory=dict)      # index -> highest exhausted k
    lines: Counter = field(default_factory=Counter)   # piece path -> valid lines (rows written)
    duplicates: int = 0
    torn: int = 0
    stale: int = 0

    def next_replacement(self, index: int) -> int:
        """The replacement number a (resumed) run starts ``index`` with."""
        return self.exhausted.get(index, -1) + 1

    def rows_by_rank(self) -> dict[str, int]:
        """Rows written per process rank (from the piece names ``rows-r{rank}-...``), over all runs."""
        out: Counter = Counter()
        for path, n in self.lines.items():
            out[str(int(path.name.split("-")[1][1:]))] += n
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


class Checkpoint:
    """The checkpoint of one config in one output directory."""

    def __init__(self, out: Path, config: str):
        self.config = config
        self.dir = build_state_dir(out, config)

    # -- fingerprint -------------------------------------------------------------------------------
    def read_fingerprint(self) -> dict[str, Any] | None:
        path = self.dir / "fingerprint.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def write_fingerprint(self, fingerprint: str, settings: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "fingerprint.json",
                          json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=1) + "\n")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def drop_pieces(self) -> None:
        """After a successful merge: the rows now live in the shards."""
        for path in self.pieces():
            path.unlink(missing_ok=True)
            Path(str(path)[: -len(".jsonl")] + ".stats.json").unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------------
    def pieces(self) -> list[Path]:
        return sorted(self.dir.glob(PIECE_GLOB)) if self.dir.is_dir() else []

    def scan(self, rows: int, expected_uuid: Callable[..., str]) -> ScanResult:
        """Index every complete, valid line; first occurrence of an index wins. ``expected_uuid(index)``
        (``expected_uuid(index, k)`` for a replacement k > 0) validates each line's uuid."""
        result = ScanResult()
        for path in self.pieces():
            for offset, line in _lines(path):
                try:
                    rec = json.loads(line)
                    index, uid, k = int(rec["i"]), rec["u"], int(rec.get("k") or 0)
                except (ValueError, KeyError, TypeError, AttributeError):
                    result.torn += 1
                    continue
                if not 0 <= index < rows or k < 0 or uid != (expected_uuid(index, k) if k else expected_uuid(index)):
                    result.stale += 1
                    continue
                if rec.get("x"):
                    result.exhausted[index] = max(k, result.exhausted.get(index, -1))
                    continue
                result.lines[path] += 1
                if index in result.locations:
                    result.duplicates += 1
                else:
                    result.locations[index] = (path, offset, len(line))
                    result.tokens[index] = int(rec.get("t") or 0)
                    if k:
                        result.replacements[index] = k
        return result

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.dir.glob("rows-*.stats.json")) if self.dir.is_dir() else []:
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Complete lines (ending in a newline) with their byte offsets; a torn tail is skipped."""
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                yield offset, line
            offset += len(line)


def read_rows(locations: list[tuple[Path, int, int]]) -> Iterator[dict]:
    """The row dicts at ``locations`` (in the given order), reading each piece with seeks."""
    handles: dict[Path, Any] = {}
    try:
        for path, offset, length in locations:
            fh = handles.get(path)
            if fh is None:
                fh = handles[path] = open(path, "rb")  # noqa: SIM115 - closed in finally
            fh.seek(offset)
            yield json.loads(fh.read(length))["r"]
    finally:
        for fh in handles.values():
            fh.close()


class PieceWriter:
    """Append finished rows of one process to a fresh piece; keep its stats file current."""

    def __init__(self, checkpoint: Checkpoint, *, rank: int, world: int, backend: str,
                 fsync_s: float = 1.0, stats_s: float = 2.0):
        checkpoint.dir.mkdir(parents=True, exist_ok=True)
        stem = f"rows-r{rank:03d}-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"
        self.path = checkpoint.dir / f"{stem}.jsonl"
        self.stats_path = checkpoint.dir / f"{stem}.stats.json"
        self._fh = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self.rank, self.world, self.backend = rank, world, backend
        self.fsync_s, self.stats_s = fsync_s, stats_s
        self.started = time.monotonic()
        self._last_sync = self._last_stats = self.started
        self.rows = self.exhausted = 0
        self.dropped: Counter = Counter()
        self.generated_tokens = 0
        self.write_stats()

    def write(self, index: int, uuid: str, row: dict, *, replacement: int = 0, tokens: int = 0) -> None:
        rec: dict[str, Any] = {"i": index, "u": uuid}
        if replacement:
            rec["k"] = replacement
        self._append({**rec, "t": int(tokens), "r": row})
        self.rows += 1

    def mark_exhausted(self, index: int, uuid: str, replacement: int) -> None:
        """Spec ``replacement`` of row ``index`` used up its attempts: a resume starts at the next one."""
        self._append({"i": index, "u": uuid, "k": replacement, "x": 1})
        self.exhausted += 1

    def _append(self, rec: dict) -> None:
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
        self._fh.write(line.encode("utf-8") + b"\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_s:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def update(self, *, dropped: Counter, generated_tokens: int) -> None:
        self.dropped, self.generated_tokens = Counter(dropped), int(generated_tokens)
        if time.monotonic() - self._last_stats >= self.stats_s:
            self.write_stats()

    def write_stats(self) -> None:
        self._last_stats = time.monotonic()
        data = {"rank": self.rank, "world": self.world, "backend": self.backend, "rows": self.rows,
                "exhausted": self.exhausted, "dropped": dict(self.dropped),
                "generated_tokens": self.generated_tokens, "wall_s": round(self._last_stats - self.started, 3)}
        atomic_write_text(self.stats_path, json.dumps(data) + "\n")

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        self.write_stats()
