"""The recipe's `data` section -> planned samples -> per-epoch DataLoaders, for one stage (SFT or DPO).

    samples = load_samples(recipe.data.train, "sft", recipe.data, seed=recipe.seed, skips=skips)
    planned = plan(samples, processor, recipe.data, skips)
    make_loader, batches_per_epoch = loader_factory(planned, processor, recipe.data, stage="sft",
                                                    micro_batch_size=4, seed=0, num_replicas=1, rank=0)
    for batch in make_loader(epoch): ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.collate import DPOCollator, PackedSFTCollator, RenderedDataset, SFTCollator
from data.length import LengthGroupedSampler, PlannedSample, plan_lengths
from data.sources import SkipCounter, iter_samples, mix
from data.synthetic import DEMO_COUNTS, write_synthetic
from recipe.schema import STAGE_FORMATS, SYNTHETIC_DIR, DataSection, Source

log = logging.getLogger(__name__)

# The synthetic dataset's file for each (stage, split); generated once under the source's `path` (write_synthetic
# is idempotent).
SYNTHETIC_FILES = {("sft", "train"): "sft_train", ("sft", "eval"): "sft_eval",
                   ("dpo", "train"): "pref_train", ("dpo", "eval"): "pref_eval"}


def stage_sources(sources: tuple[Source, ...], stage: str) -> list[Source]:
    """The sources a stage reads: SFT formats for sft, preference formats for dpo; `synthetic` feeds both."""
    return [s for s in sources if s.format in STAGE_FORMATS[stage]]


def concrete(source: Source, stage: str) -> Source:
    """A `synthetic` source becomes the jsonl file of its split, in the TRL format of the stage."""
    if source.format != "synthetic":
        return source
    root = Path(source.path or SYNTHETIC_DIR)
    paths = write_synthetic(root, seed=0, **DEMO_COUNTS)
    split = "eval" if source.split in ("eval", "test", "validation") else "train"
    file = getattr(paths, SYNTHETIC_FILES[(stage, split)])
    return Source(format="trl_messages" if stage == "sft" else "trl_preference", path=str(file),
                      image_root=str(root), weight=source.weight, limit=source.limit)


def load_samples(sources: tuple[Source, ...], stage: str, data: DataSection, *, seed: int, skips: SkipCounter,
                 main_first: Callable = contextlib.nullcontext) -> list:
    """Every sample of the stage's sources. Several sources are mixed by weight into as many samples as they hold
    together (`data.sources.mix`: a weight above a source's share upsamples it); each sample keeps its origin."""
    chosen = stage_sources(sources, stage)
    if not chosen:
        raise ValueError(f"the {stage} stage found no source of a format it reads in the recipe's data section")
    with main_first():  # rank 0 writes the synthetic data, the others wait and then read it
        concrete_sources = [concrete(s, stage) for s in chosen]
    per_source = [list(iter_samples(s, on_bad_sample=data.on_bad_sample, skip_counter=skips)) for s in concrete_sources]
    if len(per_source) == 1:
        return per_source[0]
    return list(mix(per_source, [s.weight for s in concrete_sources], seed=seed,
                    num_samples=sum(len(samples) for samples in per_source)))


def plan(samples: list, processor, data: DataSection, skips: SkipCounter) -> list[PlannedSample]:
    planned = plan_lengths(samples, processor, max_length=data.max_length, on_overlong=data.on_overlong,
                           max_image_pixels=data.max_image_pixels, on_bad_sample=data.on_bad_sample, skips=skips)
    if not planned:
        raise ValueError("no sample is left after length planning: every row was dropped or skipped\n" + skips.summary())
    return planned


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

    def __init__(self, lengths: list[int], max_tokens: int, seed: int, *, num_replicas: int = 1, rank: int = 0):
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


class IndexedRows(Dataset):
    """Rows paired with their sample index, so a batch can say which planned samples it holds (`indices`)."""

    def __init__(self, rows: Dataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, dict]:
        return index, self.rows[index]


class CollateWithIndices:
    """The stage's collator on the rows, plus `indices` (int64, one per sample) of the planned samples."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items: list[tuple[int, dict]]) -> dict:
        batch = self.collate([row for _, row in items])
        batch["indices"] = torch.tensor([index for index, _ in items], dtype=torch.long)
        return batch


def loader_factory(planned: list[PlannedSample], processor, data: DataSection, *, stage: str, micro_batch_size: int,
                   seed: int, num_replicas: int, rank: int,
                   share_prompt: bool = True) -> tuple[Callable[[int], DataLoader], int]:
    """(epoch -> DataLoader, micro-batches per rank per epoch). Rendering, decoding and cropping run in workers.
    `share_prompt`: DPO batches also carry the prefix-sharing layout (data.collate.DPOCollator)."""
    dataset = RenderedDataset(planned, processor, assistant_turns=data.assistant_turns,
                              max_image_pixels=data.max_image_pixels)
    pad_id = processor.tokenizer.pad_token_id
    lengths = [p.num_tokens for p in planned]
    if stage == "dpo":
        collate = DPOCollator(pad_token_id=pad_id, share_prompt=share_prompt)
    elif data.packing:
        collate = PackedSFTCollator(max_tokens=data.max_length)
    else:
        collate = SFTCollator(pad_token_id=pad_id)
    if data.packing and stage == "sft":
        sampler = PackedBatchSampler(lengths, data.max_length, seed, num_replicas=num_replicas, rank=rank)
    elif data.group_by_length:
        sampler = LengthGroupedSampler(lengths, micro_batch_size, seed, num_replicas=num_replicas, rank=rank,
                                       drop_last=True)
    else:
        sampler = ShuffledBatchSampler(len(planned), micro_batch_size, seed, num_replicas=num_replicas, rank=rank)

    def make(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        return DataLoader(IndexedRows(dataset), batch_sampler=sampler, collate_fn=CollateWithIndices(collate),
                          num_workers=data.num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available())

    return make, len(sampler)


def stage_loaders(recipe, processor, stage: str, skips: SkipCounter, *, num_replicas: int = 1, rank: int = 0,
                  main_first: Callable = contextlib.nullcontext):
    """(planned samples, epoch -> DataLoader, micro-batches per rank per epoch) of the recipe's training data for
    `stage` ('sft' or 'dpo'), sharded over `num_replicas` ranks; `main_first` lets rank 0 write shared files first."""
    samples = load_samples(recipe.data.train, stage, recipe.data, seed=recipe.seed, skips=skips, main_first=main_first)
    planned = plan(samples, processor, recipe.data, skips)
    make_loader, batches_per_epoch = loader_factory(
        planned, processor, recipe.data, stage=stage, micro_batch_size=recipe.train.micro_batch_size,
        seed=recipe.seed, num_replicas=num_replicas, rank=rank, share_prompt=recipe.dpo.share_prompt)
    return planned, make_loader, batches_per_epoch
