"""The planned samples of a stage held compactly: numpy arrays for the numbers, one UTF-8 JSON record per sample.

    table = PlanTable.from_planned(planned)      # list[PlannedSample] -> table (same order)
    table[i]                                     # the i-th PlannedSample, rebuilt on demand (equal to planned[i])
    table.lengths()                              # token lengths as an int array, without rebuilding a sample
    table.data_fingerprint()                     # == train.core.checkpoint.data_fingerprint(planned)

A `list[PlannedSample]` costs about 2 KB of Python objects per row (the sample's turns, parts, strings, paths,
origin and the plan's tuples); at a million rows that is GBs on every rank, and every DataLoader worker forked from
it touches the pages (reference counts) and copies them. The table holds per row: the token counts (int32), the
origin (dataset index int32 + row int64), offsets into the image arrays (int64), the images' token counts and sizes
(int32), and the sample's conversation as compact JSON text (its size is the text's, plus the image paths):
`bytes_per_row()` states it. A sample is rebuilt when asked for (in the DataLoader worker that renders it), in about
10-20 us, so the training loop never holds more than a batch of them.

It is what the plan cache (data/plan_cache.py) writes and reads: `arrays()` / `from_arrays()` round-trip through
`numpy.savez` without pickling.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data.length import PlannedSample
from data.sample import ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn

FINGERPRINT_KEY = "data_fingerprint"


def fingerprint_line(origin: Origin, num_tokens: int, image_token_counts: tuple[int, ...]) -> bytes:
    """One planned sample's line of the data fingerprint (train.core.checkpoint.data_fingerprint hashes these in order)."""
    return f"{origin}|{num_tokens}|{image_token_counts}\n".encode()


def _turn_json(turn: Turn) -> list:
    return [turn.role, [part.text if isinstance(part, TextPart) else 0 for part in turn.parts]]


def _turn(value: list) -> Turn:
    role, parts = value
    return Turn(role=role, parts=tuple(TextPart(p) if isinstance(p, str) else ImagePart() for p in parts))


def _ref_json(ref: ImageRef) -> str | dict:
    return str(ref.path) if ref.path is not None else {"b": base64.b64encode(ref.data).decode("ascii")}


def _ref(value: str | dict) -> ImageRef:
    return (
        ImageRef(path=Path(value)) if isinstance(value, str) else ImageRef(data=base64.b64decode(value["b"]))
    )


def encode_sample(sample: SFTSample | PreferenceSample) -> bytes:
    """The sample without its origin, as compact JSON (the origin is held in the table's arrays)."""
    if isinstance(sample, SFTSample):
        record = {"t": [_turn_json(t) for t in sample.turns], "i": [_ref_json(r) for r in sample.images]}
    else:
        record = {
            "p": [_turn_json(t) for t in sample.prompt],
            "c": _turn_json(sample.chosen),
            "r": _turn_json(sample.rejected),
            "i": [_ref_json(r) for r in sample.images],
        }
        if sample.rejected_images is not None:
            record["ri"] = [_ref_json(r) for r in sample.rejected_images]
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_sample(data: bytes, origin: Origin) -> SFTSample | PreferenceSample:
    record = json.loads(data)
    images = tuple(_ref(v) for v in record["i"])
    if "t" in record:
        return SFTSample(turns=tuple(_turn(t) for t in record["t"]), images=images, origin=origin)
    rejected_images = tuple(_ref(v) for v in record["ri"]) if "ri" in record else None
    return PreferenceSample(
        prompt=tuple(_turn(t) for t in record["p"]),
        chosen=_turn(record["c"]),
        rejected=_turn(record["r"]),
        images=images,
        origin=origin,
        rejected_images=rejected_images,
    )


def _offsets(counts: Sequence[int]) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=offsets[1:])
    return offsets


ARRAY_NAMES = (
    "dataset_index",
    "row",
    "num_tokens",
    "shared_tokens",
    "image_offsets",
    "image_counts",
    "image_sizes",
    "has_rejected",
    "rejected_offsets",
    "rejected_counts",
    "rejected_sizes",
    "record_offsets",
    "records",
)


class PlanTable(Sequence[PlannedSample]):
    """A read-only sequence of PlannedSample backed by arrays (see the module docstring)."""

    # The arrays (ARRAY_NAMES), set from `arrays` in __init__.
    dataset_index: np.ndarray
    row: np.ndarray
    num_tokens: np.ndarray
    shared_tokens: np.ndarray
    image_offsets: np.ndarray
    image_counts: np.ndarray
    image_sizes: np.ndarray
    has_rejected: np.ndarray
    rejected_offsets: np.ndarray
    rejected_counts: np.ndarray
    rejected_sizes: np.ndarray
    record_offsets: np.ndarray
    records: np.ndarray

    def __init__(self, datasets: list[str], arrays: dict[str, np.ndarray], fingerprint: str | None = None):
        missing = [name for name in ARRAY_NAMES if name not in arrays]
        if missing:
            raise ValueError(f"plan table: arrays {missing} are missing")
        self.datasets = list(datasets)
        for name in ARRAY_NAMES:
            setattr(self, name, arrays[name])
        n = len(self.num_tokens)
        for name in ("dataset_index", "row", "shared_tokens", "has_rejected"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"plan table: {name} holds {len(getattr(self, name))} values for {n} samples"
                )
        for name, data in (
            ("image_offsets", self.image_counts),
            ("rejected_offsets", self.rejected_counts),
            ("record_offsets", self.records),
        ):
            offsets = getattr(self, name)
            if (
                len(offsets) != n + 1
                or offsets[0] != 0
                or offsets[-1] != len(data)
                or np.any(np.diff(offsets) < 0)
            ):
                raise ValueError(f"plan table: {name} does not index its data")
        if len(self.image_sizes) != len(self.image_counts) or len(self.rejected_sizes) != len(
            self.rejected_counts
        ):
            raise ValueError("plan table: image sizes and token counts differ in length")
        if n and (self.dataset_index.min() < 0 or self.dataset_index.max() >= len(self.datasets)):
            raise ValueError("plan table: a dataset index is out of range")
        self._fingerprint = fingerprint

    # -------------------------------------------------------------------------------------------- building

    @classmethod
    def from_planned(cls, planned: Sequence[PlannedSample]) -> PlanTable:
        return cls._build(
            (
                plan.sample.origin.dataset,
                plan.sample.origin.row,
                plan.num_tokens,
                plan.image_token_counts,
                plan.image_sizes,
                plan.rejected_image_token_counts,
                plan.rejected_image_sizes,
                plan.shared_tokens,
                encode_sample(plan.sample),
            )
            for plan in planned
        )

    @classmethod
    def from_numbers(cls, dataset: str, rows: Sequence[tuple]) -> PlanTable:
        """From (row, numbers, record) of one dataset: numbers as data.length plans them (num_tokens, image token
        counts, image sizes, rejected counts, rejected sizes, shared tokens), record from `encode_sample`."""
        return cls._build((dataset, row, *numbers, record) for row, numbers, record in rows)

    @classmethod
    def _build(cls, items) -> PlanTable:
        datasets: dict[str, int] = {}
        index, rows, tokens, shared, has_rejected = [], [], [], [], []
        counts, sizes, rejected_counts, rejected_sizes, per_image, per_rejected = [], [], [], [], [], []
        records, record_lengths = [], []
        for (
            dataset,
            row,
            num_tokens,
            image_counts,
            image_sizes,
            rej_counts,
            rej_sizes,
            shared_tokens,
            record,
        ) in items:
            index.append(datasets.setdefault(dataset, len(datasets)))
            rows.append(row)
            tokens.append(num_tokens)
            shared.append(-1 if shared_tokens is None else shared_tokens)
            counts.extend(image_counts)
            sizes.extend(image_sizes)
            per_image.append(len(image_counts))
            has_rejected.append(rej_counts is not None)
            rejected_counts.extend(rej_counts or ())
            rejected_sizes.extend(rej_sizes or ())
            per_rejected.append(len(rej_counts or ()))
            records.append(record)
            record_lengths.append(len(record))
        arrays = {
            "dataset_index": np.asarray(index, dtype=np.int32),
            "row": np.asarray(rows, dtype=np.int64),
            "num_tokens": np.asarray(tokens, dtype=np.int32),
            "shared_tokens": np.asarray(shared, dtype=np.int32),
            "image_offsets": _offsets(per_image),
            "image_counts": np.asarray(counts, dtype=np.int32),
            "image_sizes": np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
            "has_rejected": np.asarray(has_rejected, dtype=bool),
            "rejected_offsets": _offsets(per_rejected),
            "rejected_counts": np.asarray(rejected_counts, dtype=np.int32),
            "rejected_sizes": np.asarray(rejected_sizes, dtype=np.int32).reshape(-1, 2),
            "record_offsets": _offsets(record_lengths),
            "records": np.frombuffer(b"".join(records), dtype=np.uint8),
        }
        return cls(list(datasets), arrays)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    # -------------------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.num_tokens)

    def origin(self, i: int) -> Origin:
        return Origin(dataset=self.datasets[int(self.dataset_index[i])], row=int(self.row[i]))

    def _counts(self, i: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        start, end = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
        return (
            tuple(int(c) for c in self.image_counts[start:end]),
            tuple((int(w), int(h)) for w, h in self.image_sizes[start:end]),
        )

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"plan table index {i} out of range for {len(self)} samples")
        start, end = int(self.record_offsets[i]), int(self.record_offsets[i + 1])
        sample = decode_sample(self.records[start:end].tobytes(), self.origin(i))
        counts, sizes = self._counts(i)
        rejected_counts = rejected_sizes = None
        if self.has_rejected[i]:
            lo, hi = int(self.rejected_offsets[i]), int(self.rejected_offsets[i + 1])
            rejected_counts = tuple(int(c) for c in self.rejected_counts[lo:hi])
            rejected_sizes = tuple((int(w), int(h)) for w, h in self.rejected_sizes[lo:hi])
        shared = int(self.shared_tokens[i])
        return PlannedSample(
            sample=sample,
            num_tokens=int(self.num_tokens[i]),
            image_token_counts=counts,
            image_sizes=sizes,
            rejected_image_token_counts=rejected_counts,
            rejected_image_sizes=rejected_sizes,
            shared_tokens=None if shared < 0 else shared,
        )

    def image_fields(self, i: int) -> list[tuple[str, ImageRef]]:
        """(field, ref) of every image sample i decodes in training, as `data.decode_check.image_fields(self[i])` gives
        them, from its record alone (no sample rebuilt)."""
        start, end = int(self.record_offsets[i]), int(self.record_offsets[i + 1])
        record = json.loads(self.records[start:end].tobytes())
        fields = [(f"images[{k}]", _ref(v)) for k, v in enumerate(record["i"])]
        return fields + [(f"rejected_images[{k}]", _ref(v)) for k, v in enumerate(record.get("ri") or ())]

    def __iter__(self) -> Iterator[PlannedSample]:
        return (self[i] for i in range(len(self)))

    def lengths(self, *, shared: bool = False) -> np.ndarray:
        """Token lengths; `shared`: a pair's prefix-sharing row length where it has one (DPO grouping)."""
        if not shared:
            return self.num_tokens.copy()
        return np.where(self.shared_tokens >= 0, self.shared_tokens, self.num_tokens)

    def data_fingerprint(self) -> str:
        """sha256 of `fingerprint_line` over the samples in order: train.core.checkpoint.data_fingerprint's value."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            offsets, counts = self.image_offsets.tolist(), self.image_counts.tolist()
            for i, (dataset, row, tokens) in enumerate(
                zip(self.dataset_index.tolist(), self.row.tolist(), self.num_tokens.tolist())
            ):
                origin = Origin(dataset=self.datasets[dataset], row=row)
                digest.update(fingerprint_line(origin, tokens, tuple(counts[offsets[i] : offsets[i + 1]])))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def bytes_per_row(self) -> float:
        """Bytes the arrays hold per planned sample (what this table costs in memory, per row)."""
        return sum(a.nbytes for a in self.arrays().values()) / max(1, len(self))
