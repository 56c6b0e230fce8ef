"""The sequence-parallel layout of a job (`train.sequence_parallel: N`): which ranks share a sequence, how the data
is split over the groups, and what a rank counts of a batch its group shares.

Ranks r, r+1, ..., r+N-1 (r a multiple of N) form a group: consecutive ranks, so a group sits on one node whenever
N divides the GPUs per node and its all-to-alls stay on NVLink. The group's ranks hold the same micro-batch: the
samplers shard the data over world / N data-parallel replicas, and group g reads replica g's batches. Gradients are
still all-reduced over every rank by DDP / DeepSpeed / FSDP (each rank of a group holds the gradient of its chunk of
the loss; their sum is the group's gradient), so nothing else in the loop changes
(docs/distributed.md#sequence-parallelism).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.distributed as dist

from models.phi3v.modeling import enable_sequence_parallel
from models.phi3v.sequence_parallel import SequenceParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSplit:
    """How the training data is sharded: `replicas` data-parallel groups, this rank reading group `rank`'s share."""

    replicas: int
    rank: int


def data_split(num_processes: int, process_index: int, size: int) -> DataSplit:
    return DataSplit(replicas=num_processes // size, rank=process_index // size)


def check_layout(num_processes: int, size: int) -> None:
    if num_processes % size:
        raise ValueError(
            f"train.sequence_parallel={size} does not divide the {num_processes} processes of this "
            f"launch: each group of {size} ranks shares a sequence; launch a multiple of {size} "
            "processes or change the group"
        )


def form_groups(accelerator, size: int) -> SequenceParallel | None:
    """This rank's group (every rank creates every group, in order, as torch.distributed requires); None for N = 1."""
    if size == 1:
        return None
    world, index = accelerator.num_processes, accelerator.process_index
    check_layout(world, size)
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    if accelerator.is_main_process:
        log.info(
            "sequence parallel: %d group(s) of %d ranks, each sequence split over its group; data parallel "
            "over %d replica(s)",
            world // size,
            size,
            world // size,
        )
    return SequenceParallel(groups[index // size], size, index % size)


def layout(accelerator, size: int) -> tuple[SequenceParallel | None, DataSplit]:
    """(this rank's group or None, how the data is split): what a training stage asks before it plans its data."""
    return form_groups(accelerator, size), data_split(
        accelerator.num_processes, accelerator.process_index, size
    )


def attach(model, sp: SequenceParallel | None) -> None:
    """Give the model its group (before prepare: the wrappers keep the attribute on the inner modules)."""
    if sp is not None:
        enable_sequence_parallel(model, sp)


def owner_weight(sp: SequenceParallel | None) -> float:
    """1 on the rank that counts a value every rank of its group computed whole (a DPO loss, a pair count), else 0."""
    return 1.0 if sp is None or sp.is_owner else 0.0
