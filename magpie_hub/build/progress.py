"""The build's terminal display: a rich live progress line per config and a closing table."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table


def _rate(value: float) -> str:
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


class BuildProgress:
    """One live task per config: rows done / requested, rows/s, generated tokens/s and ETA.

    Rates count this run's work only (resumed rows are shown as already done). With data-parallel runs
    the display (rank 0) counts rank 0's rows times the world size, labelled as an estimate.
    """

    def __init__(self, console: Console | None = None, *, enabled: bool = True, world: int = 1):
        self.console = console or Console(stderr=True)
        self.world = world
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rps]}"), TextColumn("{task.fields[tps]}"),
            TextColumn("{task.fields[dropped]}"), TimeRemainingColumn(),
            console=self.console, disable=not enabled, transient=False,
        )
        self._tasks: dict[str, tuple[TaskID, float, int]] = {}

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, config: str, total: int, done: int) -> None:
        label = config if self.world == 1 else f"{config} (~{self.world} procs)"
        task = self._progress.add_task(label, total=total, completed=done, rps="- rows/s", tps="- tok/s", dropped="")
        self._tasks[config] = (task, time.monotonic(), done)

    def update(self, config: str, *, new_rows: int, tokens: int, dropped: Mapping[str, int],
               replaced: int = 0) -> None:
        task, started, done = self._tasks[config]
        elapsed = max(time.monotonic() - started, 1e-6)
        rows = done + new_rows * self.world
        n_dropped = sum(dropped.values())
        notes = ([f"dropped {n_dropped}"] if n_dropped else []) + ([f"replaced {replaced}"] if replaced else [])
        self._progress.update(task, completed=rows, rps=f"{_rate(new_rows * self.world / elapsed)} rows/s",
                              tps=f"{_rate(tokens * self.world / elapsed)} tok/s", dropped=", ".join(notes))

    def endpoints(self, status: list[Mapping] | None) -> None:
        """One line per endpoint of a pool (backends/http/pool.py): state, in flight / capacity, request
        and token rates, failures and times taken out."""
        for e in status or ():
            key = f"endpoint {e['url']}"
            if key not in self._tasks:
                self._tasks[key] = (self._progress.add_task("", total=None, rps="", tps="", dropped=""), time.monotonic(), 0)
            notes = [f"ok {e['ok']:,}"] + ([f"failed {e['failures']}"] if e["failures"] else []) + \
                ([f"taken out {e['taken_out']}x"] if e["taken_out"] else [])
            self._progress.update(self._tasks[key][0], description=f"  {e['url']} ({e['state']})",
                                  completed=e["in_flight"], total=max(e["capacity"], 1),
                                  rps=f"{e['requests_per_s']} req/s", tps=f"{e['tokens_per_s']} tok/s",
                                  dropped=", ".join(notes))


def _kept(kept: int, generated: int) -> str:
    return f"{kept / generated:.0%}" if generated else "-"


def summary_table(configs: Mapping[str, Mapping], *, run_wall_s: float) -> Table:
    """Closing table from the manifest's per-config entries (cumulative over resumed runs): rows (new in this
    run), rows replaced (their spec exhausted its attempts), rows with a kept truncated turn, drops, the
    share of generated tokens kept in written rows and wall time (device-hours: in the manifest and card)."""
    table = Table(title=f"magpie-hub build (this run: {run_wall_s:,.1f} s)", box=box.SIMPLE_HEAD)
    table.add_column("config", no_wrap=True)
    for col in ("rows", "new", "repl.", "trunc."):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("dropped", overflow="fold", min_width=9)
    for col in ("tokens", "kept", "wall s"):   # generated tokens, and the share kept in written rows
        table.add_column(col, justify="right", no_wrap=True)
    total: Counter = Counter()
    for name, c in configs.items():
        dropped = c.get("dropped") or {}
        text = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(name, f"{c.get('rows', 0):,}", f"{c.get('new_rows', 0):,}", f"{c.get('replaced', 0):,}",
                      f"{c.get('truncated_rows', 0):,}", text, f"{c.get('generated_tokens', 0):,}",
                      _kept(c.get("kept_tokens", 0), c.get("generated_tokens", 0)), f"{c.get('wall_time_s', 0):,.1f}")
        total.update({"rows": c.get("rows", 0), "new": c.get("new_rows", 0), "drop": sum(dropped.values()),
                      "tok": c.get("generated_tokens", 0), "kept": c.get("kept_tokens", 0),
                      "replaced": c.get("replaced", 0), "truncated": c.get("truncated_rows", 0)})
        total["wall"] += c.get("wall_time_s", 0)
    if len(configs) > 1:
        table.add_row("[bold]total", f"{total['rows']:,}", f"{total['new']:,}", f"{total['replaced']:,}",
                      f"{total['truncated']:,}", f"{total['drop']:,}", f"{total['tok']:,}", _kept(total["kept"], total["tok"]),
                      f"{total['wall']:,.1f}")
    return table


def mix_table(configs: Mapping[str, Mapping]) -> Table:
    """Closing table of the configs with mix targets (manifest ``configs.{name}.mix``): target vs achieved
    rows per bucket, what the classifier put there and what overflowed, the steering its rows needed."""
    table = Table(title="mix: target vs achieved", box=box.SIMPLE_HEAD)
    for col, justify in (("config", "left"), ("bucket", "left"), ("target", "right"), ("rows", "right"),
                         ("classified", "right"), ("overflow", "right"), ("steered by (top)", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for name, c in configs.items():
        mix = c.get("mix")
        if not mix:
            continue
        for dim, buckets in mix["buckets"].items():
            for label, b in buckets.items():
                top = next(iter(b.get("steered_by") or {}), "-")
                table.add_row(name, f"{dim}: {label}", f"{b['target_rows']} ({b['target_share']:.1%})",
                              f"{b['rows']} ({b['share']:.1%})", str(b["classified"]), str(b["overflow"]), top)
        table.add_row(name, "[bold]all", f"{c.get('rows', 0)}", f"{mix['accepted']}", f"{mix['candidates']} cand.",
                      f"acc. {mix['acceptance_rate'] or 0:.0%}", f"{mix['tokens_per_accepted_row'] or 0:,.0f} tok/row; "
                      f"classifier {mix['classifier'].get('name', '?')}")
    return table
