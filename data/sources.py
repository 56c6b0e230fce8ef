"""Reading the rows of one recipe data source as canonical samples, and mixing several sources by weight.

One loading path for every source: `datasets.load_dataset`. A hub id or a local dataset folder (an imagefolder with
`metadata.jsonl`/`metadata.csv` and a `file_name` column, or a clone of a hub dataset repo) is passed as the path; a
local `.json` (a list of rows), `.jsonl`, `.parquet` or `.arrow` file goes through the matching packaged builder as
the single split `train`. The result is read as an `IterableDataset` with Image decoding off, so image columns give
`{"bytes", "path"}` dicts that become `ImageRef`s and pixels are never decoded here.

    skips = SkipCounter()
    source = Source(format="vqa", path="HuggingFaceM4/ChartQA", split="train", weight=2.0)  # recipe.Source
    for sample in iter_samples(source, on_bad_sample="skip", skip_counter=skips):
        ...
    print(skips.summary())
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import datasets
from datasets.formatting import PythonFormatter
from datasets.table import cast_table_to_features

from config.schema import Source
from data.adapters import Adapter, adapter_for, apply_columns, resolved_under, skip_reason
from data.paths import path_problem, resolved
from data.sample import DataError, Origin, PreferenceSample, SFTSample

logger = logging.getLogger(__name__)

Sample = SFTSample | PreferenceSample
OnBadSample = Literal["error", "skip"]
S = TypeVar("S")

# A local file is read by the packaged `datasets` builder for its suffix.
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


def source_name(source: Source) -> str:
    """How errors, skips and origins name the source: `path[config]:split`."""
    config = f"[{source.config}]" if source.config else ""
    return f"{source.path}{config}:{source.split}"


def image_root_of(source: Source) -> Path | None:
    """The source's image_root, else the local folder it lives in; None for a hub dataset (paths then fail)."""
    if source.image_root is not None:
        return Path(source.image_root)
    path = Path(source.path)
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


def check_text_file(path: Path, *, json_lines: bool) -> None:
    """A local .json/.jsonl file must hold rows, be UTF-8 and (for .jsonl) hold one JSON value per line; each
    problem is one message naming the file and the line (row), instead of the reader's bare error."""
    if path.stat().st_size == 0:
        raise ValueError(
            f"data source {path}: the file is empty (0 bytes, no rows). Fix: point the source at a "
            "file with rows, or remove the source"
        )
    rows = 0
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"data source {path}: line {number} is not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                    f"{error.start + 1}). Fix: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            rows += 1
            if json_lines:
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"data source {path}: line {number} (row {rows - 1}) is not valid JSON "
                        f"({error.msg} at column {error.colno}). Fix: correct or delete that line"
                    ) from None
                except RecursionError:
                    raise ValueError(
                        f"data source {path}: line {number} (row {rows - 1}) nests JSON too deeply to "
                        "read. Fix: correct or delete that line"
                    ) from None
                if (
                    "\\ud" in line.lower()
                ):  # an escaped surrogate: a lone one is no text (the reader refuses it)
                    _check_unicode(value, path, number, rows - 1)
    if rows == 0:
        raise ValueError(
            f"data source {path}: the file holds no rows (only blank lines). Fix: point the source at a "
            "file with rows, or remove the source"
        )


def _check_unicode(value: Any, path: Path, number: int, row: int) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"data source {path}: line {number} (row {row}) holds text that is not valid Unicode (a lone "
            f"surrogate {error.object[error.start]!r}, written as a \\u escape). Fix: correct or delete "
            "that line"
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_dataset(source: Source) -> datasets.Dataset | datasets.IterableDataset:
    path = Path(source.path)
    if path.suffix in LOCAL_FILE_BUILDERS:
        why = path_problem(path)
        if why == "does not exist":
            raise ValueError(f"data source {source.path!r}: no such file; fix the source's path")
        if why is not None:
            raise ValueError(
                f"data source {source.path!r} {why}. Fix: point the source's path at a readable file"
            )
        if path.suffix in (".json", ".jsonl"):
            check_text_file(path, json_lines=path.suffix == ".jsonl")
        try:
            return datasets.load_dataset(
                LOCAL_FILE_BUILDERS[path.suffix],
                data_files={"train": str(path)},
                split=source.split,
                streaming=source.streaming,
            )
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error.__context__ or error
            raise ValueError(
                f"data source {source.path}: cannot be read as {LOCAL_FILE_BUILDERS[path.suffix]} "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
            ) from error
    if path.is_absolute() or source.path.startswith("."):
        target, why = resolved(path)
        if target is None:
            raise ValueError(f"data source {source.path!r} {why}. Fix: point the source's path at a folder")
        if not target.exists():
            raise ValueError(f"data source {source.path!r}: no such folder; fix the source's path")
    try:
        return datasets.load_dataset(
            source.path,
            name=source.config,
            split=source.split,
            revision=source.revision,
            streaming=source.streaming,
        )
    except ConnectionError as error:
        if not _offline():
            raise
        raise ValueError(
            f"data source {source.path!r}: not a local folder and not in the datasets cache, and "
            "HF_HUB_OFFLINE=1 forbids downloading it. Fix: download it once online, or point the "
            "source's path at a local copy"
        ) from error


def _with_undecoded_images(feature: Any) -> Any:
    """`feature` with every (nested) Image set to decode=False, so rows carry `{"bytes", "path"}` dicts. Only Image:
    `IterableDataset.decode(False)` would also stop decoding Json columns, in which `datasets` stores mixed-type
    values as JSON text (message content that is a string in one turn and a list in another would arrive as '"S"')."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False)
    if isinstance(feature, dict):  # Features, or the dict of a struct
        return type(feature)({key: _with_undecoded_images(value) for key, value in feature.items()})
    if isinstance(feature, datasets.List):
        return datasets.List(_with_undecoded_images(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_with_undecoded_images(feature.feature))
    return feature


def load_rows(source: Source) -> datasets.IterableDataset:
    """The source's raw rows, in order, with image columns left encoded (`{"bytes", "path"}` dicts)."""
    dataset = _load_dataset(source)
    if isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset()
    if not isinstance(dataset, datasets.IterableDataset):
        raise ValueError(
            f"data source {source_name(source)}: split {source.split!r} does not name one split "
            f"(got {type(dataset).__name__}); set the source's split"
        )
    if dataset.features is not None:  # unknown features (streamed json) hold no Image columns
        dataset = dataset.cast(_with_undecoded_images(dataset.features))
    return dataset if source.limit is None else dataset.take(source.limit)


def indexed_rows(source: Source) -> datasets.Dataset | None:
    """The source's rows as a map-style dataset (random access, so that row ranges can be read by several
    processes), `limit` applied; None for a source that only streams. `rows_in_range` reads a range of it exactly as
    `load_rows` reads the whole (image columns left encoded)."""
    if source.streaming:
        return None
    dataset = _load_dataset(source)
    if not isinstance(dataset, datasets.Dataset):
        return None
    return dataset if source.limit is None else dataset.select(range(min(source.limit, len(dataset))))


ROWS_PER_READ = 1000
"""Rows `rows_in_range` takes from the Arrow table at a time."""


def rows_in_range(dataset: datasets.Dataset, start: int, stop: int) -> Iterator[dict]:
    """Rows [start, stop) of `dataset`, equal to what `dataset.select(range(start, stop)).to_iterable_dataset()`
    cast to `_with_undecoded_images` yields (tests/data/test_plan_cache.py), but read ROWS_PER_READ rows at a time: each
    Arrow slice is decoded by `datasets`' own Python formatter as one batch (JSON columns parsed, image columns left
    encoded), instead of one formatter pass per row through the iterable dataset's machinery."""
    if dataset.features is None:
        rows = dataset.select(range(start, stop)).to_iterable_dataset()
        yield from rows
        return
    features = _with_undecoded_images(dataset.features)
    formatter = PythonFormatter(features=features)
    schema = features.arrow_schema
    arrow = dataset.with_format("arrow")
    for begin in range(start, stop, ROWS_PER_READ):
        table = arrow[begin : min(begin + ROWS_PER_READ, stop)]
        if table.schema != schema:
            table = cast_table_to_features(table, features)
        batch = formatter.format_batch(table)
        for i in range(table.num_rows):
            yield {column: values[i] for column, values in batch.items()}


def adapt_row(adapter: Adapter, row: dict, source: Source, index: int, image_root: Path | None) -> Sample:
    """Row `index` of `source` as a canonical sample (what `iter_samples` yields for it); a bad row raises."""
    origin = Origin(dataset=source_name(source), row=index)
    return adapter(
        apply_columns(row, dict(source.columns or {}), origin=origin), origin=origin, image_root=image_root
    )


class SkipCounter:
    """Rows skipped under `on_bad_sample: skip`, counted per dataset and reason. A row is counted once even when its
    source is read again (a mixture re-reads a source to fill its quota)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._skipped: set[Origin] = set()
        self.records: list[tuple[str, int, str, str]] = []
        """(dataset, row, field, problem) of each row counted, in order (the plan cache stores a stage's)."""

    def record(self, error: DataError) -> None:
        if error.origin in self._skipped:
            return
        self._skipped.add(error.origin)
        self.records.append((error.origin.dataset, error.origin.row, error.field, error.problem))
        key = (error.origin.dataset, skip_reason(error))
        self._counts[key] += 1
        # The first skip of each kind is a warning with its full message; the rest go to debug, not to flood the log.
        log = logger.warning if self._counts[key] == 1 else logger.debug
        log("skipping bad row: %s (counted under '%s')", error, key[1])

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def counts(self) -> dict[str, dict[str, int]]:
        """{dataset: {reason: number of rows skipped}}."""
        by_dataset: dict[str, dict[str, int]] = {}
        for (dataset, reason), count in sorted(self._counts.items()):
            by_dataset.setdefault(dataset, {})[reason] = count
        return by_dataset

    def summary(self) -> str:
        """One line per dataset, for the end-of-run log."""
        if not self._counts:
            return "no rows skipped"
        return "\n".join(
            f"{dataset}: {sum(reasons.values())} rows skipped ("
            + ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
            + ")"
            for dataset, reasons in self.counts().items()
        )


def _check_skip_policy(on_bad_sample: str, skip_counter: SkipCounter | None) -> None:
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample is {on_bad_sample!r}; choose 'error' or 'skip'")
    if on_bad_sample == "skip" and skip_counter is None:
        raise ValueError("on_bad_sample='skip' needs a SkipCounter, so that the skipped rows can be reported")


def iter_samples(
    source: Source, *, on_bad_sample: OnBadSample = "error", skip_counter: SkipCounter | None = None
) -> Iterator[Sample]:
    """The source's rows as canonical samples, in row order. A bad row raises its `DataError`, or under 'skip' is
    counted in `skip_counter` and left out; a source whose every row is bad raises even under 'skip' (it is a wrong
    format or columns mapping, not bad data)."""
    adapter = adapter_for(source.format, dataset=source_name(source))
    _check_skip_policy(on_bad_sample, skip_counter)
    return _adapted(source, adapter, on_bad_sample=on_bad_sample, skip_counter=skip_counter)


def _adapted(
    source: Source, adapter: Adapter, *, on_bad_sample: OnBadSample, skip_counter: SkipCounter | None
) -> Iterator[Sample]:
    name, image_root, columns = source_name(source), image_root_of(source), dict(source.columns or {})
    resolved_under.cache_clear()  # image paths are resolved afresh for each read of a source
    first_error: DataError | None = None
    num_rows = num_samples = 0
    for num_rows, row in enumerate(load_rows(source), start=1):
        origin = Origin(dataset=name, row=num_rows - 1)
        try:
            sample = adapter(apply_columns(row, columns, origin=origin), origin=origin, image_root=image_root)
        except DataError as error:
            if on_bad_sample == "error":
                raise
            skip_counter.record(error)
            first_error = first_error or error
            continue
        num_samples += 1
        yield sample
    if num_samples == 0 and first_error is not None:
        raise ValueError(
            f"data source {name}: all {num_rows} rows are bad, the first: {first_error}; check the "
            "source's format and columns"
        )


def apportion(num_samples: int, weights: Sequence[float]) -> list[int]:
    """Integer quotas summing to `num_samples`, proportional to `weights` (largest remainder; ties go to the
    earlier stream)."""
    total = sum(weights)
    exact = [num_samples * weight / total for weight in weights]
    quotas = [math.floor(share) for share in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: num_samples - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _check_mix_args(streams: Sequence[Iterable[S]], weights: Sequence[float], num_samples: int) -> None:
    if not streams or len(streams) != len(weights):
        raise ValueError(
            f"mix needs one weight per stream, got {len(streams)} streams and {len(weights)} weights"
        )
    for i, weight in enumerate(weights):
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"mixture weight {i} is {weight!r}; weights must be positive numbers (leave a source "
                "out rather than giving it weight 0)"
            )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"mixture num_samples is {num_samples!r}; it must be a positive integer")


def mix(
    streams: Sequence[Iterable[S]], weights: Sequence[float], *, seed: int, num_samples: int
) -> Iterator[S]:
    """`num_samples` items drawn from `streams` in proportion to `weights`; each item is passed through unchanged
    (a sample keeps its Origin).

    Policy: the quotas are exact (`apportion`). The order is a seeded random draw without replacement from the
    remaining quotas, so every interleaving is equally likely and the same seed gives the same order. Each stream
    is read in its own order; a stream that runs out before its quota is read again from its start (a weight above
    the stream's share of the data upsamples it), which needs a re-iterable stream (a list, a dataset,
    `SourceSamples`), not a one-shot iterator.
    """
    _check_mix_args(streams, weights, num_samples)
    return _draw(streams, apportion(num_samples, weights), random.Random(seed))


def _draw(streams: Sequence[Iterable[S]], quotas: list[int], rng: random.Random) -> Iterator[S]:
    remaining = list(quotas)
    iterators = [iter(stream) for stream in streams]
    for _ in range(sum(quotas)):
        # Picking stream i with probability remaining[i] / sum(remaining) is a uniform shuffle of the quotas.
        i = rng.choices(range(len(streams)), weights=remaining)[0]
        remaining[i] -= 1
        yield _next_item(streams, iterators, i)


def _next_item(streams: Sequence[Iterable[S]], iterators: list[Iterator[S]], i: int) -> S:
    try:
        return next(iterators[i])
    except StopIteration:
        logger.info("mixture: stream %d ran out before its quota; reading it again from the start", i)
    iterators[i] = iter(streams[i])
    try:
        return next(iterators[i])
    except StopIteration:
        raise ValueError(
            f"mixture stream {i} has no items to fill its quota: it is empty, or a one-shot iterator "
            "that cannot be read again (pass a list)"
        ) from None
