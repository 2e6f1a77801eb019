"""Data-parallel coordination of a build: rank, world size, barrier, broadcast, rank shares.

Started under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1), processes coordinate through
accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs); a single process needs none of it.

Multi-node (``torchrun --nnodes N --nproc_per_node K --rdzv-backend c10d --rdzv-endpoint HOST:PORT``, all
nodes writing one shared ``--out``): the rows still missing are read from the checkpoint by rank 0 and
broadcast, and rank ``r`` of ``w`` takes items ``r, r + w, r + 2w, ...`` of that list (:meth:`Dist.share`):
the shares are disjoint, cover every missing row and depend only on (checkpoint, rank, world size), even
when a shared filesystem shows the nodes slightly different states. A node lost mid-run: the survivors
fail at the next collective; with ``--max-restarts`` torchrun restarts them and waits for the node to be
relaunched (or resubmit the job, with any world size); every rank then re-reads the checkpoint, so the
finished rows are kept and the rest is shared anew. Rank 0 merges once, after the last barrier.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list


class Dist:
    """Rank, world size and barrier: accelerate's PartialState when launched distributed, else trivial."""

    def __init__(self) -> None:
        self.state = None
        self.rank, self.world, self.local_rank = 0, 1, 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=48))
            self.rank, self.world = self.state.process_index, self.state.num_processes
            self.local_rank = self.state.local_process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device_map(self) -> dict[str, int] | None:
        """Under data parallelism on GPUs, each process's model goes on its own local GPU."""
        return {"": self.local_rank} if self.world > 1 and torch.cuda.is_available() else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, items: list) -> list:
        """This process's share of rank 0's ``items``: every ``world``-th item from ``rank`` (see module doc)."""
        return list(self.broadcast(items))[self.rank::self.world]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (so all ranks take the same decisions)."""
        if self.state is None:
            return obj
        return broadcast_object_list([obj], from_process=0)[0]
