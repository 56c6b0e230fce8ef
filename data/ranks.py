"""The ranks of a job as data preparation sees them: who I am, how many we are, and one collective (gather).

    ranks = Ranks.current()                  # from torch.distributed when a process group is up, else (0, 1)
    mine = ranks.block(len(items))           # this rank's contiguous share: range(start, stop)
    everyone = ranks.gather_results(work)    # runs work() here, returns every rank's result in rank order

Work shared out this way (length planning, decoding before training) must not leave a rank waiting forever in the
collective when another rank raises: `gather_results` catches the local failure, gathers it with the others'
results, and then every rank raises (the failing rank its own exception, the others a RuntimeError naming it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world=dist.get_world_size())
        return cls()

    def block(self, n: int) -> range:
        """This rank's contiguous share of n items (the first n % world ranks take one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (pickled through the process group)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def gather_results(self, work: Callable[[], Any]) -> list[Any]:
        """Every rank's `work()`, in rank order; a failure on any rank raises on every rank (see the docstring)."""
        if self.world == 1:
            return [work()]
        try:
            outcome: tuple[bool, Any] = (True, work())
            failure = None
        except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks know
            outcome, failure = (False, f"{type(error).__name__}: {error}"), error
        gathered = self.gather(outcome)
        if failure is not None:
            raise failure
        failed = [(r, message) for r, (ok, message) in enumerate(gathered) if not ok]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"rank {rank} failed while preparing the data: {message}")
        return [value for _, value in gathered]

    def all_true(self, flag: bool) -> bool:
        return all(self.gather(bool(flag)))


def cores_per_rank(world: int) -> int:
    """CPU cores this process may use for data preparation: its affinity set shared by the node's ranks (an even
    share; LOCAL_WORLD_SIZE when the launcher sets it, else the job's world size)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return max(1, cores // max(1, local))
