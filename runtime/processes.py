"""The processes of a job: forming the process group under torchrun's elastic restarts
(`init_restartable_process_group`), whether several processes work together (`several_processes`) and whether the
model's parameters are sharded over them (`shards_parameters`: ZeRO-3, FSDP), and the ranks as data preparation sees
them: who I am, how many we are, and one collective (gather).

    ranks = Ranks.current()                  # from torch.distributed when a process group is up, else (0, 1)
    mine = ranks.block(len(items))           # this rank's contiguous share: range(start, stop)
    everyone = ranks.gather_results(work)    # runs work() here, returns every rank's result in rank order

Work shared out this way (length planning, decoding before training) must not leave a rank waiting forever in the
collective when another rank raises: `gather_results` catches the local failure, gathers it with the others'
results, and then every rank raises (the failing rank its own exception, the others a RuntimeError naming it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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


def several_processes() -> bool:
    """Whether a torch.distributed process group of more than one rank exists (DDP, DeepSpeed, FSDP)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def shards_parameters(accelerator) -> bool:
    """Whether the prepared model's parameters are partitioned across ranks (DeepSpeed ZeRO-3, FSDP); False without
    an accelerator or for a stand-in without a distributed type."""
    from accelerate import DistributedType

    distributed_type = getattr(accelerator, "distributed_type", None)
    if distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return distributed_type == DistributedType.FSDP


def init_restartable_process_group(timeout: timedelta) -> bool:
    """Under torchrun's elastic agent with restarts allowed (`launch.sh --max-restarts`), form the process group on a
    store prefixed by the restart attempt; True if it did. With the static rendezvous (accelerate's default) the
    agent keeps one TCPStore across restarts and the ranks' gloo/NCCL bootstrap keys carry no attempt in their
    name, so a restarted rank can read the address its peer had in the attempt before and connect to a dead
    process ("Gloo connectFullMesh failed ... Connection refused", or a hang): seen in tests/whole_run/test_elastic.py.
    accelerate (and DeepSpeed) then use the group formed here."""
    if (
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) < 1
        or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or torch.distributed.is_initialized()
    ):
        return False
    from torch.distributed import PrefixStore, TCPStore

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        store=PrefixStore(f"phi3v/attempt-{attempt}", agent_store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    log.info(
        "process group formed for restart attempt %s of at most %s",
        attempt,
        os.environ["TORCHELASTIC_MAX_RESTARTS"],
    )
    return True
