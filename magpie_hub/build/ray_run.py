"""``magpie-hub build RECIPE --ray ADDRESS``: the rank shares of a build as Ray tasks, then one merge.

The driver (the CLI process) validates everything and prepares the directory (under its lock), as a
build does, then starts ``workers`` Ray tasks. Task ``r`` of ``w`` runs the ordinary build loop
(:func:`magpie_hub.build.run.run_build`) as a non-main rank with :class:`ShareDist`: it takes the missing rows
whose index is ``r`` modulo ``w`` (disjoint and deterministic from (rank, world size) alone, whatever
state each task reads when it starts), appends them to its own checkpoint pieces and returns; it neither
merges nor writes the manifest. A task whose worker dies (node lost, ``kill -9``, pre-emption) is retried by
Ray (``max_retries``) and resumes from the checkpoint: the rows it had finished are kept. When every task
has returned, the driver runs the build once more as the only process: every row is there (any a failed
share left is generated then), it merges once, writes the manifest and the card follows as usual.

Resources: a task asks for ``num_cpus`` and, for the local ``transformers`` backend, ``num_gpus`` (default 1
when the cluster has GPUs; Ray sets ``CUDA_VISIBLE_DEVICES`` so each task's model lands on its own GPU).
For the server backends a task is a client (one is enough for a pool of endpoints; it drives them all).
``ADDRESS``: ``local`` starts a private Ray instance on this machine; ``auto`` joins the cluster this
node belongs to (``ray start`` / KubeRay head); ``ray://HOST:10001`` is a Ray client connection. The output
directory must be on storage every node sees (NFS, Lustre, a mounted bucket), like multi-node torchrun.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from magpie_hub.build.checkpoint import build_state_dir
from magpie_hub.build.lock import dataset_lock
from magpie_hub.build.progress import BuildProgress
from magpie_hub.build.run import (
    BuildResult,
    _prepare,
    _validate_chat_format,
    check_fingerprints,
    check_out_dir,
    run_build,
)
from magpie_hub.errors import RecipeError
from magpie_hub.generate.backends import backend_class
from magpie_hub.layout import WORK_DIR
from magpie_hub.recipe.schema import Recipe

log = logging.getLogger(__name__)


class ShareDist:
    """A build rank run as a Ray task: rank ``r`` of ``w``, no collectives (the driver merges)."""

    local_rank = 0
    main = False

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def device_map(self) -> None:
        return None                      # Ray gives each task its own CUDA_VISIBLE_DEVICES

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj

    def share(self, items: list) -> list:
        """The missing rows ``(index, replacement)`` whose index is ``rank`` modulo ``world``."""
        return [item for item in items if item[0] % self.world == self.rank]


def workers_file(out: Path, rank: int) -> Path:
    """Where a share records the process that runs it (pid, host, attempt start): for operators and tests."""
    return Path(out, WORK_DIR, "ray", f"share-{rank:03d}.json")


def _run_share(rec: Recipe, recipe_path: str, out: str, names: list[str], rank: int, world: int,
               build_kwargs: dict) -> int:
    """One Ray task: build rank ``rank`` of ``world`` (resuming from the checkpoint); the rows it wrote."""
    import json
    import socket  # in the Ray worker process only (this function is shipped to it)

    path = workers_file(Path(out), rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
    run_build(rec, recipe_path=Path(recipe_path), out=out, configs=names, console=Console(stderr=True, quiet=True),
              dist=ShareDist(rank, world), **build_kwargs)
    return rank


def _ray():
    try:
        import ray  # optional extra: only a --ray build needs it
    except ImportError:
        raise RecipeError("--ray needs Ray: pip install 'magpie-hub[ray]'") from None
    return ray


def _pieces_rows(out: Path, names: list[str]) -> int:
    return sum(p.read_bytes().count(b"\n") for n in names for p in build_state_dir(out, n).glob("rows-*.jsonl"))


def run_build_ray(rec: Recipe, *, recipe_path: Path, address: str, workers: int | None = None,
                  out: str | Path | None = None, configs: list[str] | None = None, fresh: bool = False,
                  console: Console | None = None, worker_setup: str | None = None, max_retries: int = 3,
                  **build_kwargs) -> BuildResult:
    """Build ``rec`` with its rank shares as Ray tasks on ``address``, then merge once here.
    ``worker_setup``: "module.function" Ray runs in each worker first (the pipeline's: model references)."""
    ray = _ray()
    names = rec.select(configs)
    out = Path(out if out is not None else Path("data") / rec.name).resolve()
    backend_class(rec.backend)
    check_out_dir(out)
    status = check_fingerprints(rec, out, names, fresh)
    _validate_chat_format(rec, names)
    mixed = [n for n in names if rec.configs[n].mix is not None]
    if mixed:
        raise RecipeError(f"config {mixed[0]!r} has mix targets, which one process builds; run it without --ray")
    console = console or Console(stderr=True)
    started_here = not ray.is_initialized()
    if started_here:
        # workers of a local instance inherit this environment; a cluster's nodes have their own (no secret
        # is put in the runtime env: Ray stores it in its control store)
        env = {"worker_process_setup_hook": worker_setup} if worker_setup else {}
        ray.init(address=None if address == "local" else address, runtime_env=env, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False,
                 **({"num_cpus": max(2, workers or 1)} if address == "local" else {}))
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        local = rec.backend == "transformers"
        n = workers or (max(1, int(gpus)) if local else 1)
        task = ray.remote(_run_share).options(num_cpus=1, num_gpus=1 if local and gpus else 0, max_retries=max_retries,
                                              retry_exceptions=False)
        with dataset_lock(out, "build"):
            _prepare(rec, out, names, status, fresh)
            todo = [name for name in names if status[name] != "done"]
            if todo:
                console.print(f"ray: {n} share(s) of {', '.join(todo)} on {address} "
                              f"({int(gpus)} GPU(s) in the cluster)", highlight=False)
                shipped = {k: v for k, v in build_kwargs.items() if k != "mix_classifier"}   # no mix config here
                refs = [task.remote(rec, str(recipe_path), str(out), todo, r, n, shipped) for r in range(n)]
                _wait(ray, refs, out, todo, sum(rec.configs[t].rows for t in todo), console)
            return run_build(rec, recipe_path=recipe_path, out=out, configs=names, fresh=False, console=console,
                             **build_kwargs)
    finally:
        if started_here:
            ray.shutdown()


def _wait(ray, refs: list, out: Path, names: list[str], total: int, console: Console,
          poll: Callable[[Path, list[str]], int] = _pieces_rows) -> None:
    """Wait for every share (a retried one included), showing the rows written so far."""
    with BuildProgress(console) as progress:
        label = "+".join(names) + f" ({len(refs)} ray shares)"
        progress.start(label, total, 0)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, timeout=1.0)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:    # failed all its retries: the merge pass makes its rows
                    console.print(f"ray: a share failed after its retries ({type(exc).__name__}); its missing rows "
                                  "are generated by the final pass", highlight=False)
            progress.update(label, new_rows=min(total, poll(out, names)), tokens=0, dropped={})
