"""One local source planned in parallel, straight into a PlanTable: reading, adapting and length planning shared
out over the ranks of the job and the cores of each rank, so that no process holds every sample as Python objects.

    built = build_table(source, processor, recipe.data, skips, ranks=Ranks.current(), workers=2, progress=True)

Rank r reads the r-th contiguous block of the source's rows (a map-style `datasets.Dataset`: random access into
its Arrow file), in `workers` forked processes; each row is adapted (data/adapters.py), planned (data/length.py:
chat template, tokens, image headers) and encoded for the table (data/plan_table.py). The blocks' results are
gathered in row order, so every rank assembles the same table. The result equals what `data.loaders.read_samples`
+ `data.length.plan_lengths` give (tests/data/test_plan_cache.py): the same samples, the same skips in the same order
(rows the adapter refuses first, then rows planning refuses or finds over-long, in row order), the same first error
under `on_bad_sample: error`, and the same "every row is bad" error.

Used for a stage with exactly one source that is not streamed (several sources are mixed by a seeded draw over all
of their samples, and a streamed one has no row ranges): `build_table` returns None for anything else and the
caller plans as before.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from data.adapters import adapter_for, resolved_under
from data.length import (
    MIN_ROWS_PER_WORKER,
    PLAN_BATCH,
    BatchPlanner,
    PlannedSample,
    Sample,
    _check_policies,
    overlong_error,
)
from data.plan_table import PlanTable, decode_sample, encode_sample
from data.sample import DataError, Origin
from data.sources import SkipCounter, adapt_row, image_root_of, indexed_rows, rows_in_range, source_name
from runtime.processes import Ranks

logger = logging.getLogger(__name__)

# Per row: (row, None, field, problem) when the adapter refused it; (row, numbers, record) once adapted, numbers
# being data.length's tuple (num_tokens, counts, sizes, rejected counts, rejected sizes, shared) or
# (None, field, problem) when planning refused it.
_Part = tuple[list[tuple], list[tuple], list[str]]


class _Block:
    def __init__(self, dataset, source, processor, max_pixels: int):
        self.dataset, self.source = dataset, source
        self.planner = BatchPlanner(processor, max_pixels)
        self.adapter = adapter_for(source.format, dataset=source_name(source))
        self.image_root = image_root_of(source)

    def run(self, start: int, stop: int, bar=None) -> _Part:
        refused: list[tuple] = []
        planned: list[tuple] = []
        paths: dict[str, None] = {}
        batch: list[tuple[int, Sample]] = []

        def plan_batch() -> None:
            for (row, sample), numbers in zip(
                batch, self.planner.numbers([s for _, s in batch]), strict=True
            ):
                planned.append((row, numbers, b"" if numbers[0] is None else encode_sample(sample)))
            if bar is not None:
                bar.update(len(batch))
            batch.clear()

        for row, raw in enumerate(rows_in_range(self.dataset, start, stop), start=start):
            try:
                sample = adapt_row(self.adapter, raw, self.source, row, self.image_root)
            except DataError as error:
                refused.append((row, error.field, error.problem))
                if bar is not None:
                    bar.update(1)
                continue
            except Exception:
                plan_batch()  # the rows before this one first, as when each row was planned right after reading
                raise
            for ref in (*sample.images, *(getattr(sample, "rejected_images", None) or ())):
                if ref.path is not None:
                    paths.setdefault(str(ref.path))
            batch.append((row, sample))
            if len(batch) == PLAN_BATCH:
                plan_batch()
        plan_batch()
        return refused, planned, list(paths)


_FORKED: _Block | None = None


def _run_range(bounds: tuple[int, int]) -> _Part:
    return _FORKED.run(*bounds)


def _processes(workers: int, rows: int) -> int:
    """Worker processes a block of `rows` is planned in: 1 (this process) when forking costs more than it saves."""
    if workers <= 1 or rows < 2 * MIN_ROWS_PER_WORKER or "fork" not in mp.get_all_start_methods():
        return 1
    return workers


def _run_block(block_reader: _Block, block: range, workers: int, progress: bool) -> _Part:
    global _FORKED
    desc = "reading + planning rows"
    if _processes(workers, len(block)) == 1:
        with tqdm(
            total=len(block), desc=desc, unit="row", disable=not progress, leave=False, mininterval=2.0
        ) as bar:
            return block_reader.run(block.start, block.stop, bar)
    chunk = max(MIN_ROWS_PER_WORKER // 4, -(-len(block) // (workers * 8)))
    bounds = [(start, min(start + chunk, block.stop)) for start in range(block.start, block.stop, chunk)]
    refused, planned, paths = [], [], {}
    _FORKED = block_reader
    try:
        with (
            mp.get_context("fork").Pool(workers) as pool,
            tqdm(
                total=len(block),
                desc=f"{desc} ({workers} processes)",
                unit="row",
                disable=not progress,
                leave=False,
                mininterval=2.0,
            ) as bar,
        ):
            for part_refused, part_planned, part_paths in pool.imap(_run_range, bounds):
                refused += part_refused
                planned += part_planned
                paths.update(dict.fromkeys(part_paths))
                bar.update(len(part_refused) + len(part_planned))
    finally:
        _FORKED = None
    return refused, planned, list(paths)


def build_table(
    source, processor, data, skips: SkipCounter, *, ranks: Ranks, workers: int, progress: bool
) -> tuple[PlanTable, list[str]] | None:
    """(the planned samples of `source` before decoding, the distinct image files they use), or None for a
    source this path does not read (see the module docstring)."""
    _check_policies(data.max_length, data.on_overlong, data.on_bad_sample)
    started = time.perf_counter()
    dataset = indexed_rows(source)
    if dataset is None:
        return None
    opened = time.perf_counter()
    resolved_under.cache_clear()  # image paths are resolved afresh for each read of a source (forks inherit this)
    reader = _Block(dataset, source, processor, data.max_image_pixels)
    block = ranks.block(len(dataset))
    parts = ranks.gather_results(lambda: _run_block(reader, block, workers, progress))
    logger.info(
        "%s: %d rows opened as Arrow in %.1f s (converted by datasets on a first read), then read, adapted and "
        "planned in %.1f s over %d rank(s) x %d process(es)",
        source_name(source),
        len(dataset),
        opened - started,
        time.perf_counter() - opened,
        ranks.world,
        _processes(workers, len(block)),
    )
    refused = [item for part in parts for item in part[0]]
    planned = [item for part in parts for item in part[1]]
    paths = list(dict.fromkeys(path for part in parts for path in part[2]))
    name = source_name(source)
    errors = [DataError(Origin(dataset=name, row=row), field, problem) for row, field, problem in refused]
    if errors and data.on_bad_sample == "error":
        raise errors[0]
    if errors and not planned:
        raise ValueError(
            f"data source {name}: all {len(dataset)} rows are bad, the first: {errors[0]}; check the "
            "source's format and columns"
        )
    for error in errors:
        skips.record(error)
    return _assemble(name, planned, data, skips), paths


def _assemble(name: str, planned: Sequence[tuple], data, skips: SkipCounter) -> PlanTable:
    """The table of the rows that plan within max_length; the others raise or are counted, in row order."""
    kept = []
    for row, numbers, record in planned:
        origin = Origin(dataset=name, row=row)
        if numbers[0] is None:
            error = DataError(origin, numbers[1], numbers[2])
            if data.on_bad_sample == "error":
                raise error
            skips.record(error)
            continue
        if numbers[0] > data.max_length:
            counts, sizes, rejected_counts, rejected_sizes, shared = numbers[1:]
            plan = PlannedSample(
                sample=decode_sample(record, origin),
                num_tokens=numbers[0],
                image_token_counts=counts,
                image_sizes=sizes,
                rejected_image_token_counts=rejected_counts,
                rejected_image_sizes=rejected_sizes,
                shared_tokens=shared,
            )
            error = overlong_error(plan, data.max_length)
            if data.on_overlong == "error":
                raise error
            skips.record(error)
            continue
        kept.append((row, numbers, record))
    return PlanTable.from_numbers(name, kept)
