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
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from config.schema import STAGE_FORMATS, SYNTHETIC_DIR, DataSection, Source
from data import plan_cache
from data.collate import DPOCollator, PackedSFTCollator, RenderedDataset, SFTCollator
from data.decode_check import validate_images
from data.length import PlannedSample, plan_lengths
from data.multipage import write_multipage
from data.plan_build import build_table
from data.plan_table import PlanTable
from data.sample import DataError, Origin
from data.samplers import LengthGroupedSampler, PackedBatchSampler, ShuffledBatchSampler
from data.sources import SkipCounter, iter_samples, mix, source_name
from data.synthetic import DEMO_COUNTS, write_synthetic
from runtime.processes import Ranks, cores_per_rank

log = logging.getLogger(__name__)

# The synthetic dataset's file for each (stage, split); generated once under the source's `path` (write_synthetic
# is idempotent).
SYNTHETIC_FILES = {
    ("sft", "train"): "sft_train",
    ("sft", "eval"): "sft_eval",
    ("dpo", "train"): "pref_train",
    ("dpo", "eval"): "pref_eval",
}


def stage_sources(sources: tuple[Source, ...], stage: str) -> list[Source]:
    """The sources a stage reads: SFT formats for sft, preference formats for dpo; `synthetic` feeds both."""
    return [s for s in sources if s.format in STAGE_FORMATS[stage]]


def concrete(source: Source, stage: str) -> Source:
    """A `synthetic` source becomes the jsonl file of its split, in the TRL format of the stage; `config:
    multipage` (or `multipage-<pages>`) selects the multi-page document task (data/multipage.py)."""
    if source.format != "synthetic":
        return source
    root = Path(source.path or SYNTHETIC_DIR)
    paths = synthetic_paths(root, source.config)
    split = "eval" if source.split in ("eval", "test", "validation") else "train"
    file = getattr(paths, SYNTHETIC_FILES[(stage, split)])
    return Source(
        format="trl_messages" if stage == "sft" else "trl_preference",
        path=str(file),
        image_root=str(root),
        weight=source.weight,
        limit=source.limit,
    )


def synthetic_paths(root: Path, config: str | None):
    """Write (once) and locate the synthetic dataset a `synthetic` source's `config` names."""
    if config is None:
        return write_synthetic(root, seed=0, **DEMO_COUNTS)
    name, _, pages = config.partition("-")
    if name != "multipage" or (pages and not pages.isdigit()):
        raise ValueError(
            f"a synthetic source's config is null (the demo's task) or multipage[-<pages>], got {config!r}"
        )
    return write_multipage(root, **({"pages": int(pages)} if pages else {}))


def load_samples(
    sources: tuple[Source, ...],
    stage: str,
    data: DataSection,
    *,
    seed: int,
    skips: SkipCounter,
    main_first: Callable = contextlib.nullcontext,
) -> list:
    """Every sample of the stage's sources. Several sources are mixed by weight into as many samples as they hold
    together (`data.sources.mix`: a weight above a source's share upsamples it); each sample keeps its origin."""
    return read_samples(concrete_sources(sources, stage, main_first), data, seed=seed, skips=skips)


def concrete_sources(
    sources: tuple[Source, ...], stage: str, main_first: Callable = contextlib.nullcontext
) -> list:
    """The stage's sources, a `synthetic` one written (by rank 0 first) and replaced by its jsonl file."""
    chosen = stage_sources(sources, stage)
    if not chosen:
        raise ValueError(
            f"the {stage} stage found no source of a format it reads in the recipe's data section"
        )
    with main_first():  # rank 0 writes the synthetic data, the others wait and then read it
        return [concrete(s, stage) for s in chosen]


def read_samples(concrete_sources: list[Source], data: DataSection, *, seed: int, skips: SkipCounter) -> list:
    """Every sample of these (concrete) sources, mixed by weight when there are several (see load_samples)."""
    per_source = [
        list(iter_samples(s, on_bad_sample=data.on_bad_sample, skip_counter=skips)) for s in concrete_sources
    ]
    if len(per_source) == 1:
        return per_source[0]
    return list(
        mix(
            per_source,
            [s.weight for s in concrete_sources],
            seed=seed,
            num_samples=sum(len(samples) for samples in per_source),
        )
    )


def plan(
    samples: list,
    processor,
    data: DataSection,
    skips: SkipCounter,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    main_first: Callable = contextlib.nullcontext,
    ranks: Ranks | None = None,
    workers: int = 1,
) -> list[PlannedSample]:
    """Token lengths from image headers (data/length.py), then every image decoded once (data/decode_check.py), so
    that a corrupt file stops the run (or is skipped and counted) before step 1. `cache_dir` remembers the files
    that decoded; `main_first` lets rank 0 decode (and fill the cache) before the other ranks read it. `ranks`
    (every rank calling this with the same samples): planning and decoding are shared out over the ranks instead,
    each rank planning a block of the rows (in `workers` processes) and decoding a share of the images."""
    ranks = ranks or Ranks()
    planned = plan_lengths(
        samples,
        processor,
        max_length=data.max_length,
        on_overlong=data.on_overlong,
        max_image_pixels=data.max_image_pixels,
        on_bad_sample=data.on_bad_sample,
        skips=skips,
        ranks=ranks,
        workers=workers,
        progress=progress,
    )
    planned = decoded(
        planned, data, skips, cache_dir=cache_dir, progress=progress, main_first=main_first, ranks=ranks
    )
    if not planned:
        raise ValueError(
            "no sample is left after length planning: every row was dropped or skipped\n" + skips.summary()
        )
    return planned


def decoded(
    planned,
    data: DataSection,
    skips: SkipCounter,
    *,
    cache_dir: Path | None,
    progress: bool,
    main_first: Callable,
    ranks: Ranks,
):
    """`planned` less the samples with an image that does not decode (data/decode_check.py): shared out over the ranks
    when there are several, else decoded by rank 0 first (`main_first`) so that the others read its cache."""
    if planned and ranks.world > 1:
        return validate_images(
            planned,
            on_bad_sample=data.on_bad_sample,
            skips=skips,
            max_pixels=data.max_image_pixels,
            cache_dir=cache_dir,
            progress=progress,
            ranks=ranks,
        )
    if planned:
        failure = None
        with (
            main_first()
        ):  # raise only after leaving it: rank 0 must reach the barrier the other ranks wait at
            try:
                planned = validate_images(
                    planned,
                    on_bad_sample=data.on_bad_sample,
                    skips=skips,
                    max_pixels=data.max_image_pixels,
                    cache_dir=cache_dir,
                    progress=progress,
                )
            except DataError as error:
                failure = error
        if failure is not None:
            raise failure
    return planned


def token_lengths(planned, *, shared: bool = False) -> list[int]:
    """Each planned sample's token length (`shared`: a pair's prefix-sharing row where it has one), read from a
    PlanTable's arrays without rebuilding the samples."""
    if isinstance(planned, PlanTable):
        return planned.lengths(shared=shared).tolist()
    return [(p.shared_tokens or p.num_tokens) if shared else p.num_tokens for p in planned]


SKIPPED_KEY = "skipped_rows"
"""Batch key (present only when non-empty): (dataset, row, field, problem) of each row a worker could not decode."""


class IndexedRows(Dataset):
    """Rows paired with their sample index, so a batch can say which planned samples it holds (`indices`).

    A row that fails in the worker (an image that decoded before training but not now: changed on disk, a flaky
    network disk) follows `on_bad_sample`: 'error' raises its DataError; 'skip' replaces it by the next planned
    sample that renders (index + 1, + 2, ... wrapping around) and reports it in the batch's `skipped_rows`. So a
    batch keeps its size and every rank its number of steps (no rank waits for another in a collective); the price
    is that the replacement is seen twice in that epoch."""

    def __init__(self, rows: Dataset, on_bad_sample: str = "error"):
        self.rows = rows
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, dict, list[tuple]]:
        skipped: list[tuple] = []
        for offset in range(len(self.rows)):
            candidate = (index + offset) % len(self.rows)
            try:
                return candidate, self.rows[candidate], skipped
            except DataError as error:
                if self.on_bad_sample == "error":
                    raise
                logging.getLogger(__name__).warning(
                    "skipping a row that failed in a DataLoader worker: %s", error
                )
                skipped.append((error.origin.dataset, error.origin.row, error.field, error.problem))
        raise DataError(
            Origin(dataset="data.train", row=index),
            "images",
            "no planned sample can be rendered any more: every one failed in the DataLoader worker",
        )


class CollateWithIndices:
    """The stage's collator on the rows, plus `indices` (int64, one per sample) of the planned samples, and the
    rows skipped in the worker (`skipped_rows`, only when there are some)."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, items: list[tuple[int, dict, list[tuple]]]) -> dict:
        batch = self.collate([row for _, row, _ in items])
        batch["indices"] = torch.tensor([index for index, _, _ in items], dtype=torch.long)
        skipped = [record for _, _, records in items for record in records]
        if skipped:
            batch[SKIPPED_KEY] = skipped
        return batch


class CountingDataLoader(DataLoader):
    """A DataLoader that records, in the main process, the rows its workers skipped (`skipped_rows` of each batch)
    in the stage's SkipCounter, so that summary.json counts them. (A resumed run's partial first epoch goes through
    accelerate's skip_first_batches, which rebuilds a plain DataLoader: skips there are logged but not counted.)"""

    def __init__(self, *args, skips: SkipCounter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.skips = skips

    def __iter__(self):
        for batch in super().__iter__():
            for dataset, row, field, problem in batch.get(SKIPPED_KEY, ()) if isinstance(batch, dict) else ():
                if self.skips is not None:
                    self.skips.record(DataError(Origin(dataset=dataset, row=row), field, problem))
            yield batch


def loader_factory(
    planned: list[PlannedSample],
    processor,
    data: DataSection,
    *,
    stage: str,
    micro_batch_size: int,
    seed: int,
    num_replicas: int,
    rank: int,
    skips: SkipCounter | None = None,
    share_prompt: bool = True,
) -> tuple[Callable[[int], DataLoader], int]:
    """(epoch -> DataLoader, micro-batches per rank per epoch). Rendering, decoding and cropping run in workers; a
    row that fails there follows data.on_bad_sample (IndexedRows) and is counted in `skips`. `share_prompt`: DPO
    batches also carry the prefix-sharing layout (data.collate.DPOCollator)."""
    dataset = RenderedDataset(
        planned, processor, assistant_turns=data.assistant_turns, max_image_pixels=data.max_image_pixels
    )
    pad_id = processor.tokenizer.pad_token_id
    # DPO with shared prompts groups by the shared row's length: what the LM computes per pair.
    lengths = token_lengths(planned, shared=stage == "dpo" and share_prompt)
    if stage == "dpo":
        collate = DPOCollator(pad_token_id=pad_id, share_prompt=share_prompt)
    elif data.packing:
        collate = PackedSFTCollator(max_tokens=data.max_length)
    else:
        collate = SFTCollator(pad_token_id=pad_id)
    if data.packing and stage == "sft":
        sampler = PackedBatchSampler(lengths, data.max_length, seed, num_replicas=num_replicas, rank=rank)
    elif data.group_by_length:
        sampler = LengthGroupedSampler(
            lengths, micro_batch_size, seed, num_replicas=num_replicas, rank=rank, drop_last=True
        )
    else:
        sampler = ShuffledBatchSampler(
            len(planned), micro_batch_size, seed, num_replicas=num_replicas, rank=rank
        )

    def make(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        return CountingDataLoader(
            IndexedRows(dataset, data.on_bad_sample),
            batch_sampler=sampler,
            collate_fn=CollateWithIndices(collate),
            num_workers=data.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            skips=skips,
        )

    return make, len(sampler)


def plan_stage(
    recipe,
    processor,
    stage: str,
    skips: SkipCounter,
    *,
    main_first: Callable = contextlib.nullcontext,
    cache_dir: Path | None = None,
) -> PlanTable:
    """The stage's planned training samples (a PlanTable), from the plan cache under `cache_dir` when it holds this
    plan (data/plan_cache.py), else computed once: every rank of the job reads the rows, the length planning and
    the decoding before training are shared out over the ranks (and over this rank's share of the cores), and rank
    0 writes the cache. The same samples, in the same order, with the same rows left out, either way."""
    ranks = Ranks.current()
    sources = concrete_sources(recipe.data.train, stage, main_first)
    fields = (
        plan_cache.key_fields(sources, stage, recipe.data, processor, seed=recipe.seed)
        if cache_dir is not None
        else None
    )
    key = plan_cache.plan_key(fields) if fields is not None else None
    path = plan_cache.plan_path(cache_dir, stage, key) if key is not None else None
    started = time.perf_counter()
    cached = plan_cache.load_plan(path, key) if path is not None else None
    if ranks.all_true(cached is not None):
        cached.replay_skips(skips)
        log.info(
            "plan cache: %d planned %s samples read from %s in %.1f s (%.0f bytes per planned row)",
            len(cached.table),
            stage,
            path,
            time.perf_counter() - started,
            cached.table.bytes_per_row(),
        )
        return cached.table
    if fields is None and cache_dir is not None:
        log.info(
            "plan cache: not used for %s (a source that is not a local file or folder, or is streamed); "
            "planning every run",
            ", ".join(source_name(s) for s in sources),
        )
    first_skip = len(skips.records)
    workers = cores_per_rank(ranks.world)
    built = (
        build_table(
            sources[0], processor, recipe.data, skips, ranks=ranks, workers=workers, progress=ranks.rank == 0
        )
        if len(sources) == 1
        else None
    )
    if (
        built is not None
    ):  # one local source: read, adapted and planned in row ranges over the ranks and cores
        table, images = built
        read_s = None
        kept = (
            decoded(
                table,
                recipe.data,
                skips,
                cache_dir=cache_dir,
                progress=ranks.rank == 0,
                main_first=main_first,
                ranks=ranks,
            )
            if len(table)
            else table
        )
        table = kept if isinstance(kept, PlanTable) else PlanTable.from_planned(kept)
        if not len(table):
            raise ValueError(
                "no sample is left after length planning: every row was dropped or skipped\n"
                + skips.summary()
            )
    else:  # several sources (mixed by a seeded draw over all their samples) or a streamed one
        samples = read_samples(sources, recipe.data, seed=recipe.seed, skips=skips)
        read_s = time.perf_counter() - started
        planned = plan(
            samples,
            processor,
            recipe.data,
            skips,
            cache_dir=cache_dir,
            progress=ranks.rank == 0,
            main_first=main_first,
            ranks=ranks,
            workers=workers,
        )
        del samples
        table, images = PlanTable.from_planned(planned), plan_cache.image_paths(planned)
    read = "" if read_s is None else f"rows read and adapted in {read_s:.1f} s on each rank; "
    log.info(
        "planned %d %s samples in %.1f s (%slengths and decoding shared over %d rank(s) x %d process(es)); "
        "%.0f bytes per planned row",
        len(table),
        stage,
        time.perf_counter() - started,
        read,
        ranks.world,
        workers,
        table.bytes_per_row(),
    )
    if path is not None and ranks.rank == 0:
        plan_cache.save_plan(path, table, skips.records[first_skip:], fields, images)
    return table


def stage_loaders(
    recipe,
    processor,
    stage: str,
    skips: SkipCounter,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    main_first: Callable = contextlib.nullcontext,
    cache_dir: Path | None = None,
):
    """(planned samples, epoch -> DataLoader, micro-batches per rank per epoch) of the recipe's training data for
    `stage` ('sft' or 'dpo'), sharded over `num_replicas` ranks; `main_first` lets rank 0 write shared files first;
    `cache_dir` remembers the images that decoded (rundir.layout.cache_dir). Too few samples for one optimizer
    step is an error naming the sources and the batch geometry."""
    planned = plan_stage(recipe, processor, stage, skips, main_first=main_first, cache_dir=cache_dir)
    make_loader, batches_per_epoch = loader_factory(
        planned,
        processor,
        recipe.data,
        stage=stage,
        micro_batch_size=recipe.train.micro_batch_size,
        seed=recipe.seed,
        num_replicas=num_replicas,
        rank=rank,
        skips=skips,
        share_prompt=recipe.dpo.share_prompt,
    )
    if batches_per_epoch < recipe.train.grad_accum:
        check_enough(len(planned), stage, recipe, num_replicas, skips)
    return planned, make_loader, batches_per_epoch


def check_enough(num_planned: int, stage: str, recipe, num_replicas: int, skips: SkipCounter) -> None:
    """Raise the 'fewer samples than one optimizer step' error (an epoch would hold no whole step)."""
    names = ", ".join(source_name(source) for source in stage_sources(recipe.data.train, stage))
    train = recipe.train
    needed = train.micro_batch_size * train.grad_accum * num_replicas
    packing = " packs of data.max_length tokens" if recipe.data.packing and stage == "sft" else " samples"
    left_out = f" ({skips.total} rows left out: {skips.summary()})" if skips.total else ""
    raise ValueError(
        f"data.train ({names}): {num_planned} {stage} samples planned{left_out}, fewer than one optimizer step "
        f"needs: train.micro_batch_size {train.micro_batch_size} x train.grad_accum {train.grad_accum} x "
        f"{num_replicas} rank(s) = {needed}{packing}. Fix: add rows, or lower train.micro_batch_size "
        "(or train.grad_accum)"
    )


def eval_loss_loader(
    planned: list[PlannedSample],
    processor,
    data: DataSection,
    *,
    batch_size: int,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Every planned SFT sample once, in order, as padded batches of `batch_size`; rank r takes batches r, r + R,
    ... (the last may be short, and ranks may get one batch more or less: nothing is left out). For a validation
    loss, where the per-token sum over ranks is what counts, not the batch shapes."""
    dataset = RenderedDataset(
        planned, processor, assistant_turns=data.assistant_turns, max_image_pixels=data.max_image_pixels
    )
    batches = [list(range(i, min(i + batch_size, len(planned)))) for i in range(0, len(planned), batch_size)]
    return DataLoader(
        dataset,
        batch_sampler=batches[rank::num_replicas],
        collate_fn=SFTCollator(pad_token_id=processor.tokenizer.pad_token_id),
        num_workers=data.num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
