"""Length planning from image headers alone (batching by length is data/samplers.py).

    skips = SkipCounter()
    planned = plan_lengths(samples, processor, max_length=4096, on_overlong="drop", on_bad_sample="skip", skips=skips)
    print(skips.summary())

`plan_lengths` reads each image's (width, height) from its file header (`data.images.image_size`, no pixel is
decoded), gets its slot count from `processor.num_image_tokens(width, height)` and tokenises the conversation once
(`data.render`), so every sample's exact token length is known before training starts. A sample over `max_length`
is dropped and counted, or raises, per the recipe's `data.on_overlong`; nothing is ever truncated, so no image is
cut. A bad row (unreadable image, image tag in the text, ...) raises or is counted, per `data.on_bad_sample`.
Skips are counted in `data.sources.SkipCounter`, the one counter the adapters use too, under the reason that
starts each problem (`"over-long"`, `"unreadable image"`, ...).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tqdm.auto import tqdm

from data.images import DEFAULT_MAX_PIXELS, image_size
from data.render import ChatTemplate, ChunkCounter, render_preference, sft_chunks, sft_length
from data.sample import DataError, ImageRef, Origin, PreferenceSample, SFTSample
from data.sources import SkipCounter
from models.phi3v.processing import Phi3VProcessor
from runtime.processes import Ranks

logger = logging.getLogger(__name__)

Sample = SFTSample | PreferenceSample
OnOverlong = Literal["drop", "error"]
OnBadSample = Literal["error", "skip"]


@dataclass(frozen=True, kw_only=True)
class PlannedSample:
    """A sample with everything batching needs, known without decoding a pixel."""

    sample: Sample
    num_tokens: int
    """Tokens of the rendered sample, image slots included; for a preference pair, the longer of its two sequences."""
    image_token_counts: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]
    """(width, height) in pixels of each image, from its header."""
    rejected_image_token_counts: tuple[int, ...] | None = None
    """Only for a preference pair with its own rejected images (image-contrast pairs)."""
    rejected_image_sizes: tuple[tuple[int, int], ...] | None = None
    shared_tokens: int | None = None
    """Only for a preference pair: the tokens of its prefix-sharing row (prompt + chosen + rejected), what DPO's
    length grouping sorts by when prompts are shared."""


@dataclass(frozen=True, kw_only=True)
class _ImagePlan:
    sizes: tuple[tuple[int, int], ...]
    token_counts: tuple[int, ...]


def _image_plan(
    refs: Sequence[ImageRef],
    processor: Phi3VProcessor,
    origin: Origin,
    field: str,
    max_pixels: int,
    sizes: dict | None = None,
) -> _ImagePlan:
    """`sizes` memoises the header sizes of image files within one planning pass (a dataset re-uses its images:
    a header is read once per file, not once per row); only sizes that were read successfully are remembered, so a
    bad file raises again for every row that uses it, naming that row."""
    result_sizes, counts = [], []
    for k, ref in enumerate(refs):
        key = (ref.path, max_pixels) if sizes is not None and ref.path is not None else None
        size = sizes.get(key) if key is not None else None
        if size is None:
            try:
                size = image_size(ref, origin, f"{field}[{k}]", max_pixels)
            except DataError as error:
                # data.images states the problem in prose (with the path); skips are counted by the phrase before ':'.
                raise DataError(origin, error.field, f"bad image: {error.problem}") from error
            if key is not None:
                sizes[key] = size
        width, height = size
        try:
            counts.append(processor.num_image_tokens(width, height))
        except ValueError as error:  # too elongated for the HD transform
            raise DataError(origin, f"{field}[{k}]", f"unusable image size: {error}") from error
        result_sizes.append((width, height))
    return _ImagePlan(sizes=tuple(result_sizes), token_counts=tuple(counts))


def plan_sample(
    sample: Sample,
    processor: Phi3VProcessor,
    *,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    sizes: dict | None = None,
) -> PlannedSample:
    """One sample's token length and image plan; a bad row raises its `DataError`. `sizes`: see `_image_plan`."""
    images = _image_plan(sample.images, processor, sample.origin, "images", max_image_pixels, sizes)
    if isinstance(sample, SFTSample):
        num_tokens = sft_length(sample, processor, images.token_counts)
        return PlannedSample(
            sample=sample,
            num_tokens=num_tokens,
            image_token_counts=images.token_counts,
            image_sizes=images.sizes,
        )
    if sample.rejected_images is None:
        pair = render_preference(sample, processor, images.token_counts)
        return PlannedSample(
            sample=sample,
            num_tokens=pair.num_tokens,
            image_token_counts=images.token_counts,
            image_sizes=images.sizes,
            shared_tokens=pair.shared_tokens,
        )
    rejected = _image_plan(
        sample.rejected_images, processor, sample.origin, "rejected_images", max_image_pixels, sizes
    )
    pair = render_preference(sample, processor, images.token_counts, rejected.token_counts)
    return PlannedSample(
        sample=sample,
        num_tokens=pair.num_tokens,
        image_token_counts=images.token_counts,
        image_sizes=images.sizes,
        rejected_image_token_counts=rejected.token_counts,
        rejected_image_sizes=rejected.sizes,
        shared_tokens=pair.shared_tokens,
    )


PLAN_BATCH = 256
"""Samples whose text chunks go to the tokenizer together (`BatchPlanner`)."""


class BatchPlanner:
    """`plan_sample`'s numbers for a batch of samples at once, equal to planning them one by one (tests/
    test_length.py): per sample the same image plan (headers, memoised in `sizes` as `plan_sample` does), the same
    validation and chat template (`data.render.sft_chunks`); then the text chunks of every SFT sample of the batch
    are counted in one tokenizer call (`data.render.ChunkCounter`) instead of one call per chunk. A preference pair
    is planned by `plan_sample` itself. Each result is what crosses process boundaries (see `_Numbers`)."""

    def __init__(self, processor: Phi3VProcessor, max_pixels: int, sizes: dict | None = None):
        self.processor, self.max_pixels = processor, max_pixels
        self.sizes: dict = {} if sizes is None else sizes
        self.counter = ChunkCounter(processor.tokenizer)
        self.template = ChatTemplate(processor)

    def numbers(self, samples: Sequence[Sample], stop_at_error: bool = False) -> list[_Numbers]:
        """One result per sample, in order; `stop_at_error`: the results end at the first bad sample (later samples
        are not planned, as `plan_lengths` stops there under on_bad_sample 'error')."""
        results: list = []
        pending: list[
            tuple[int, int, int, _ImagePlan]
        ] = []  # (result index, chunks, image slots, image plan)
        chunks: list[str] = []
        for sample in samples:
            try:
                if isinstance(sample, SFTSample):
                    images = _image_plan(
                        sample.images, self.processor, sample.origin, "images", self.max_pixels, self.sizes
                    )
                    texts, slots = sft_chunks(sample, self.processor, images.token_counts, self.template)
                    pending.append((len(results), len(texts), slots, images))
                    chunks += texts
                    results.append(None)
                else:
                    plan = plan_sample(
                        sample, self.processor, max_image_pixels=self.max_pixels, sizes=self.sizes
                    )
                    results.append(_numbers_of(plan))
            except DataError as error:
                results.append((None, error.field, error.problem))
                if stop_at_error:
                    break
        counts = self.counter.count(chunks) if chunks else []
        at = 0
        for index, num_chunks, slots, images in pending:
            num_tokens = sum(counts[at : at + num_chunks]) + slots
            results[index] = (num_tokens, images.token_counts, images.sizes, None, None, None)
            at += num_chunks
        return results


def _numbers_of(plan: PlannedSample) -> _Numbers:
    return (
        plan.num_tokens,
        plan.image_token_counts,
        plan.image_sizes,
        plan.rejected_image_token_counts,
        plan.rejected_image_sizes,
        plan.shared_tokens,
    )


def overlong_error(planned: PlannedSample, max_length: int) -> DataError:
    image_tokens = sum(planned.image_token_counts)
    field = "turns" if isinstance(planned.sample, SFTSample) else "chosen/rejected"
    return DataError(
        planned.sample.origin,
        field,
        f"over-long: {planned.num_tokens} tokens ({image_tokens} of them image slots, "
        f"{len(planned.image_token_counts)} image(s)) exceed data.max_length={max_length}; samples are never cut "
        "(that could cut through an image). Fix: raise data.max_length, lower model.num_crops (fewer slots per "
        "image), or set data.on_overlong: drop to leave such samples out",
    )


def _check_policies(max_length: int, on_overlong: str, on_bad_sample: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
    if on_overlong not in ("drop", "error"):
        raise ValueError(f"on_overlong is {on_overlong!r}; choose 'drop' or 'error'")
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample is {on_bad_sample!r}; choose 'error' or 'skip'")


def plan_lengths(
    samples: Sequence[Sample],
    processor: Phi3VProcessor,
    *,
    max_length: int,
    on_overlong: OnOverlong = "drop",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    on_bad_sample: OnBadSample = "error",
    skips: SkipCounter,
    ranks: Ranks | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[PlannedSample]:
    """Every usable sample with its token length, in input order. Dropped and skipped rows are recorded in `skips`
    (per dataset and reason; the first of each kind is logged as a warning) and summarised in the log at the end.

    Sharing the work (the result is the same, sample for sample, skip for skip, as one process planning alone):
    `ranks` (runtime.processes.Ranks, several processes of one job, every one calling this with the same samples): each
    rank plans a contiguous block of the samples and the numbers are gathered, so every rank ends with the whole
    plan; `workers` > 1: this process plans its block in that many forked processes (length planning is
    tokenisation and header reads, Python-bound). `progress`: a bar with an ETA."""
    _check_policies(max_length, on_overlong, on_bad_sample)
    samples = samples if isinstance(samples, Sequence) else list(samples)
    ranks = ranks or Ranks()
    if (
        ranks.world == 1 and workers <= 1
    ):  # one process: plan in order, stop at the first bad row under 'error'
        numbers = _NumbersOf(samples, processor, max_image_pixels, stop_at_error=on_bad_sample == "error")
        results = numbers.run(range(len(samples)), progress)
    else:
        block = ranks.block(len(samples))

        def work() -> list[_Numbers]:
            return _plan_block(samples, processor, max_image_pixels, block, workers, progress)

        results = [result for part in ranks.gather_results(work) for result in part]
    return _assemble(
        samples,
        results,
        max_length=max_length,
        on_overlong=on_overlong,
        on_bad_sample=on_bad_sample,
        skips=skips,
    )


# A plan without its sample (what crosses process boundaries): (num_tokens, image_token_counts, image_sizes,
# rejected_image_token_counts, rejected_image_sizes, shared_tokens), or (None, field, problem) for a bad row.
_Numbers = tuple


class _NumbersOf:
    def __init__(
        self,
        samples: Sequence[Sample],
        processor: Phi3VProcessor,
        max_pixels: int,
        stop_at_error: bool = False,
    ):
        self.samples = samples
        self.stop_at_error = stop_at_error
        self.planner = BatchPlanner(processor, max_pixels)

    def run(self, indices: range, progress: bool = False) -> list[_Numbers]:
        results: list[_Numbers] = []
        with tqdm(
            total=len(indices),
            desc="planning lengths",
            unit="row",
            disable=not progress,
            leave=False,
            mininterval=2.0,
        ) as bar:
            for start in range(indices.start, indices.stop, PLAN_BATCH):
                batch = range(start, min(start + PLAN_BATCH, indices.stop))
                part = self.planner.numbers(
                    [self.samples[i] for i in batch], stop_at_error=self.stop_at_error
                )
                results += part
                bar.update(len(part))
                if self.stop_at_error and part and part[-1][0] is None:
                    break  # the assembly raises it; later rows need not be planned
        return results


_FORKED: _NumbersOf | None = None  # what forked planning workers read (inherited, never pickled)


def _plan_range(bounds: tuple[int, int]) -> list[_Numbers]:
    return _FORKED.run(range(*bounds))


def _plan_block(
    samples: Sequence[Sample],
    processor: Phi3VProcessor,
    max_pixels: int,
    block: range,
    workers: int,
    progress: bool,
) -> list[_Numbers]:
    """This rank's block planned in `workers` forked processes (in order), or here when small or single."""
    global _FORKED
    numbers = _NumbersOf(samples, processor, max_pixels)
    if workers <= 1 or len(block) < MIN_ROWS_PER_WORKER * 2 or "fork" not in mp.get_all_start_methods():
        return numbers.run(block, progress)
    chunk = max(MIN_ROWS_PER_WORKER // 4, -(-len(block) // (workers * 8)))
    bounds = [(start, min(start + chunk, block.stop)) for start in range(block.start, block.stop, chunk)]
    _FORKED = numbers
    try:
        results: list[_Numbers] = []
        with (
            mp.get_context("fork").Pool(workers) as pool,
            tqdm(
                total=len(block),
                desc=f"planning lengths ({workers} processes)",
                unit="row",
                disable=not progress,
                leave=False,
                mininterval=2.0,
            ) as bar,
        ):
            for part in pool.imap(_plan_range, bounds):
                results.extend(part)
                bar.update(len(part))
        return results
    finally:
        _FORKED = None


MIN_ROWS_PER_WORKER = 2000
"""Below this many rows per worker process, forking costs more than it saves."""


def _assemble(
    samples: Sequence[Sample],
    results: Sequence[_Numbers],
    *,
    max_length: int,
    on_overlong: str,
    on_bad_sample: str,
    skips: SkipCounter,
) -> list[PlannedSample]:
    """PlannedSamples in input order from the numbers; bad and over-long rows raise or are counted, in input order."""
    planned, num_skipped_before = [], skips.total
    for sample, result in zip(samples, results):
        if result[0] is None:
            error = DataError(sample.origin, result[1], result[2])
            if on_bad_sample == "error":
                raise error
            skips.record(error)
            continue
        num_tokens, counts, sizes, rejected_counts, rejected_sizes, shared = result
        plan = PlannedSample(
            sample=sample,
            num_tokens=num_tokens,
            image_token_counts=counts,
            image_sizes=sizes,
            rejected_image_token_counts=rejected_counts,
            rejected_image_sizes=rejected_sizes,
            shared_tokens=shared,
        )
        if plan.num_tokens > max_length:
            error = overlong_error(plan, max_length)
            if on_overlong == "error":
                raise error
            skips.record(error)
            continue
        planned.append(plan)
    if skips.total > num_skipped_before:
        logger.info(
            "length planning kept %d samples; rows left out so far:\n%s", len(planned), skips.summary()
        )
    return planned
