"""The batch samplers of every stage: which planned samples form each micro-batch, per epoch and per data
replica. All three yield lists of indices into the planned samples, shuffled by (seed, epoch), the same on every rank.

- `LengthGroupedSampler`: batches of similar token lengths (little padding), each replica its share;
- `ShuffledBatchSampler`: plain shuffled batches (`data.group_by_length: false`);
- `PackedBatchSampler`: first-fit packs of whole samples up to `data.max_length` tokens (`data.packing: true`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    values = [int(length) for length in lengths]
    if not values:
        raise ValueError("no samples to batch: lengths is empty")
    if any(length < 1 for length in values):
        raise ValueError(f"lengths must be positive token counts, got a minimum of {min(values)}")
    return values


class LengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler (`DataLoader(dataset, batch_sampler=sampler)`) that puts samples of similar length together.

    Per epoch: shuffle all indices (seeded by `seed` and the epoch), cut them into mega-batches of
    `batch_size * num_replicas * mega_batch_mult`, sort each by length (longest first), cut that into steps of
    `batch_size * num_replicas` samples (so the ranks of one step get similar lengths and wait little for each
    other), shuffle the steps, and move the step holding the longest sample first (an out-of-memory shows at step 1,
    not hours in). Rank `rank` takes the `rank`-th batch of every step, so every rank gets the same number of full
    batches. The index list is first padded by wrapping around to a whole number of steps (`drop_last=False`, as
    `DistributedSampler` does), or cut to one (`drop_last=True`).

    The same (seed, epoch) gives the same batches on every rank and every run; call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        mega_batch_mult: int = 50,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        self.lengths = _check_lengths(lengths)
        for name, value in (
            ("batch_size", batch_size),
            ("mega_batch_mult", mega_batch_mult),
            ("num_replicas", num_replicas),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.batch_size, self.seed, self.mega_batch_mult = batch_size, seed, mega_batch_mult
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(
                f"{len(self.lengths)} samples do not fill one step of batch_size {batch_size} x "
                f"{num_replicas} rank(s) with drop_last=True; use drop_last=False or fewer ranks"
            )

    @property
    def step_size(self) -> int:
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        steps = len(self.lengths) / self.step_size
        return math.floor(steps) if self.drop_last else math.ceil(steps)

    def steps(self) -> list[list[list[int]]]:
        """This epoch's steps; step s holds one batch of sample indices per rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = _fit(rng.permutation(len(self.lengths)).tolist(), len(self) * self.step_size)
        mega = self.step_size * self.mega_batch_mult
        steps = []
        for start in range(0, len(order), mega):
            # Python's sort is stable: equal lengths keep their shuffled order.
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            for first in range(0, len(chunk), self.step_size):
                step = chunk[first : first + self.step_size]
                steps.append(
                    [step[r * self.batch_size : (r + 1) * self.batch_size] for r in range(self.num_replicas)]
                )
        steps = [steps[i] for i in rng.permutation(len(steps))]
        # Each step's first index is its longest sample (sorted above).
        longest = max(range(len(steps)), key=lambda s: self.lengths[steps[s][0][0]])
        steps[0], steps[longest] = steps[longest], steps[0]
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        return iter([step[self.rank] for step in self.steps()])


def _fit(order: list[int], size: int) -> list[int]:
    """`order` cut to `size`, or repeated from its start until it reaches `size`."""
    repeats = -(-size // len(order))
    return (order * repeats)[:size]


class ShuffledBatchSampler(Sampler[list[int]]):
    """Shuffle (seeded by seed and epoch), cut into steps of `batch_size * num_replicas` samples; rank r takes the
    r-th batch of each step. The sample order does not depend on batch size or rank count, so batch 8 x accumulation
    1, batch 1 x accumulation 8 and 2 ranks x accumulation 4 see the same samples in the same optimizer step.
    A tail shorter than one step is left out, so every rank gets the same number of batches."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.num_replicas)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist()
        step = self.batch_size * self.num_replicas
        for start in range(0, len(self) * step, step):
            first = start + self.rank * self.batch_size
            yield order[first : first + self.batch_size]


def pack_first_fit(lengths: list[int], max_tokens: int, seed: int) -> list[list[int]]:
    """Packs of whole samples whose token SUM is at most `max_tokens` (a packed sequence has no padding), by
    first-fit decreasing: fewer, fuller packs than a padded budget (len x longest), which never puts two samples
    longer than half the budget together. Samples are shuffled first so that equal lengths mix across epochs."""
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle decides among equal lengths
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            packs.append([i])
            room.append(max_tokens - lengths[i])
        else:
            packs[slot].append(i)
            room[slot] -= lengths[i]
    return packs


class PackedBatchSampler(Sampler[list[int]]):
    """Packs up to `max_tokens` (pack_first_fit), reshuffled per epoch, sharded by rank (the tail that does not
    divide by the rank count is left out, so every rank runs the same number of steps)."""

    def __init__(
        self, lengths: list[int], max_tokens: int, seed: int, *, num_replicas: int = 1, rank: int = 0
    ):
        self.lengths, self.max_tokens, self.seed = lengths, max_tokens, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self._count = len(self._packs()) // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _packs(self) -> list[list[int]]:
        packs = pack_first_fit(self.lengths, self.max_tokens, seed=self.seed + self.epoch)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(packs))
        return [packs[i] for i in order]

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        packs = self._packs()[: self._count * self.num_replicas]
        return iter(packs[self.rank :: self.num_replicas])
