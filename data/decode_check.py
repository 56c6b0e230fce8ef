"""Decode before you train: every image of the planned samples is fully decoded once before step 1, so that a
truncated or corrupt file is an error (or a counted skip) at the start of a run, never hours into it.

    kept = validate_images(planned, on_bad_sample="skip", skips=skips, cache_dir=Path("runs/.cache"))

Length planning reads image headers only (data/length.py); a file whose header is fine but whose pixel data is cut
short passes it. This pass decodes the pixels with the same decoder the DataLoader workers use (`data.images.load_rgb`:
first frame, mode conversion, pixel limit), in a small thread pool (Pillow releases the GIL while decoding), with a
progress bar on the main process. Each distinct image is decoded once, however many rows use it.

Cache: a file that decoded is remembered by its fingerprint (resolved path, size and modification time; the sha256
of the bytes for an image stored in the row) in `<cache_dir>/decoded-images.txt`, one fingerprint hash per line,
appended to. A second run over the same files decodes nothing; a file rewritten since (new size or mtime) is decoded
again. Only good files are remembered: a bad file is decoded again each run, and reported each time.

A bad image: under `on_bad_sample: error` the first one (in row order) raises its DataError, naming the dataset, the
row and the field (`images[k]`, `rejected_images[k]`); under `skip` every row with a bad image is left out and
counted in the SkipCounter under the reason the decoder gave.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from data.images import DEFAULT_MAX_PIXELS, load_rgb
from data.length import PlannedSample
from data.plan_table import PlanTable
from data.sample import DataError, ImageRef, Origin
from data.sources import SkipCounter
from rundir.layout import DECODED_IMAGES
from runtime.processes import Ranks, cores_per_rank

logger = logging.getLogger(__name__)

MAX_WORKERS = 8
UNDECODABLE = "image cannot be decoded"  # the reason skipped rows are counted under


def fingerprint(ref: ImageRef) -> str | None:
    """A short hash that changes when the image may have changed; None for a path that cannot be stat'ed."""
    if ref.data is not None:
        key = "bytes:" + hashlib.sha256(ref.data).hexdigest()
    else:
        try:
            status = ref.path.stat()
        except OSError:
            return None
        key = f"path:{ref.path.resolve()}:{status.st_size}:{status.st_mtime_ns}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def image_fields(plan: PlannedSample) -> list[tuple[str, ImageRef]]:
    """(field, ref) of every image a planned sample decodes in training, named as the collator names them."""
    sample = plan.sample
    fields = [(f"images[{k}]", ref) for k, ref in enumerate(sample.images)]
    rejected = getattr(sample, "rejected_images", None) or ()
    return fields + [(f"rejected_images[{k}]", ref) for k, ref in enumerate(rejected)]


def _read_cache(path: Path | None) -> set[str]:
    if path is None or not path.is_file():
        return set()
    try:
        return {
            line.strip()
            for line in path.read_text(encoding="ascii", errors="ignore").splitlines()
            if line.strip()
        }
    except OSError:
        return set()


def _append_cache(path: Path | None, keys: Sequence[str]) -> None:
    if path is None or not keys:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="ascii") as stream:
            stream.write("".join(f"{key}\n" for key in keys))
    except OSError as error:  # a read-only runs root: validation still happened, only the cache is lost
        logger.warning("image decode cache %s not written: %s", path, error)


def _decode_all(
    items: Sequence[tuple[str, tuple[Origin, str, ImageRef]]],
    max_pixels: int,
    progress: bool,
    workers: int | None,
    ranks: Ranks,
) -> list[tuple[str, DataError]]:
    """(key, error) of each image in `items` that does not decode, in a thread pool (Pillow releases the GIL)."""
    if not items:
        return []

    def decode(item: tuple[str, tuple[Origin, str, ImageRef]]) -> tuple[str, DataError | None]:
        key, (origin, field, ref) = item
        try:
            load_rgb(ref, origin, field, max_pixels)
        except DataError as error:
            return key, error
        return key, None

    workers = workers or max(1, min(MAX_WORKERS, cores_per_rank(ranks.world)))
    desc = (
        "decoding images"
        if ranks.world == 1
        else f"decoding images (rank {ranks.rank}'s share, {ranks.world} ranks)"
    )
    failures = []
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False) as bar,
    ):
        for key, error in pool.map(decode, items):
            if error is not None:
                failures.append((key, error))
            bar.update(1)
    return failures


def validate_images(
    planned: Sequence[PlannedSample],
    *,
    on_bad_sample: str,
    skips: SkipCounter,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_dir: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
    ranks: Ranks | None = None,
) -> list[PlannedSample]:
    """The planned samples whose every image decodes, in order (see the module docstring): a list, or `planned`
    itself when it is not a list and every image decoded (a PlanTable is not rebuilt). `ranks`: the processes
    of one job, each calling this with the same planned samples: each decodes its share of the images, the verdicts
    are gathered, every rank returns the same samples, and rank 0 alone appends to the cache."""
    ranks = ranks or Ranks()
    cache_file = Path(cache_dir) / DECODED_IMAGES if cache_dir is not None else None
    known = _read_cache(cache_file)
    # One decode per distinct image: key -> (first origin, field, ref) that uses it.
    todo: dict[str, tuple[Origin, str, ImageRef]] = {}
    keys_of: list[list[tuple[str, str]]] = []  # per sample: (field, key)
    uncached = 0
    path_keys: dict = {}  # a file used by many rows is stat'ed once
    table = planned if isinstance(planned, PlanTable) else None
    for i in range(len(planned)):
        # A PlanTable's images are read from its records, without rebuilding each sample.
        fields = table.image_fields(i) if table is not None else image_fields(planned[i])
        keys = []
        for field, ref in fields:
            if ref.path is not None and ref.path in path_keys:
                key = path_keys[ref.path]
            else:
                key = fingerprint(ref)
                if ref.path is not None and key is not None:
                    path_keys[ref.path] = key
            if key is None:  # cannot be stat'ed: decode it to get its DataError
                key = f"unstat:{uncached}"
                uncached += 1
            keys.append((field, key))
            if key not in known and key not in todo:
                todo[key] = (table.origin(i) if table is not None else planned[i].sample.origin, field, ref)
        keys_of.append(keys)
    started = time.perf_counter()
    items = list(todo.items())
    share = ranks.block(len(items))

    def decode_share() -> list[tuple[str, str, int, str, str]]:
        return [
            (key, error.origin.dataset, error.origin.row, error.field, error.problem)
            for key, error in _decode_all(
                items[share.start : share.stop], max_pixels, progress, workers, ranks
            )
        ]

    failures = {
        key: DataError(Origin(dataset=dataset, row=row), field, problem)
        for part in ranks.gather_results(decode_share)
        for key, dataset, row, field, problem in part
    }
    if items and ranks.rank == 0:
        _append_cache(
            cache_file, [key for key, _ in items if key not in failures and not key.startswith("unstat:")]
        )
    logger.info(
        "decoded %d images in %.1f s before training over %d rank(s) (%d known good from %s), %d bad",
        len(todo),
        time.perf_counter() - started,
        ranks.world,
        sum(1 for keys in keys_of for _, k in keys if k in known),
        cache_file or "no cache",
        len(failures),
    )
    if not failures:
        return list(planned) if isinstance(planned, list) else planned  # a PlanTable stays one
    kept = []
    for plan, keys in zip(planned, keys_of, strict=True):
        bad = next(((field, failures[key]) for field, key in keys if key in failures), None)
        if bad is None:
            kept.append(plan)
            continue
        field, first = bad
        error = DataError(plan.sample.origin, field, f"{UNDECODABLE}: {first.problem}")
        if on_bad_sample == "error":
            raise error
        skips.record(error)
    logger.warning(
        "image decoding left out %d of %d samples:\n%s",
        len(planned) - len(kept),
        len(planned),
        skips.summary(),
    )
    return kept
