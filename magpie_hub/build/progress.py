"""The build's terminal display: a rich live progress line per config and a closing table."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

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
            TextColumn("{task.fields[rps]} rows/s"), TextColumn("{task.fields[tps]} tok/s"),
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
        task = self._progress.add_task(label, total=total, completed=done, rps="-", tps="-", dropped="")
        self._tasks[config] = (task, time.monotonic(), done)

    def update(self, config: str, *, new_rows: int, tokens: int, dropped: Mapping[str, int]) -> None:
        task, started, done = self._tasks[config]
        elapsed = max(time.monotonic() - started, 1e-6)
        rows = done + new_rows * self.world
        n_dropped = sum(dropped.values())
        self._progress.update(task, completed=rows, rps=_rate(new_rows * self.world / elapsed),
                              tps=_rate(tokens * self.world / elapsed),
                              dropped=f"dropped {n_dropped}" if n_dropped else "")


def summary_table(configs: Mapping[str, Mapping], *, run_wall_s: float) -> Table:
    """Closing table from the manifest's per-config entries (cumulative over resumed runs)."""
    table = Table(title=f"magpie-hub build (this run: {run_wall_s:,.1f} s)")
    table.add_column("config", no_wrap=True)
    for col in ("rows", "new"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("dropped by reason", overflow="fold")
    for col in ("gen. tokens", "wall s", "device-h"):
        table.add_column(col, justify="right", no_wrap=True)
    total: Counter = Counter()
    for name, c in configs.items():
        dropped = c.get("dropped") or {}
        text = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "-"
        table.add_row(name, f"{c.get('rows', 0):,}", f"{c.get('new_rows', 0):,}", text,
                      f"{c.get('generated_tokens', 0):,}", f"{c.get('wall_time_s', 0):,.1f}",
                      f"{c.get('device_hours', 0):.4f}")
        total.update({"rows": c.get("rows", 0), "new": c.get("new_rows", 0), "drop": sum(dropped.values()),
                      "tok": c.get("generated_tokens", 0)})
        total["wall"] += c.get("wall_time_s", 0)
        total["dh"] += c.get("device_hours", 0)
    if len(configs) > 1:
        table.add_row("[bold]total", f"{total['rows']:,}", f"{total['new']:,}", f"{total['drop']:,}",
                      f"{total['tok']:,}", f"{total['wall']:,.1f}", f"{total['dh']:.4f}")
    return table
