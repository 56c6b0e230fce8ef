"""The plan of a stage's training data, cached on disk so that a second run, a resume or another stage reuses it.

    key = plan_key(sources, "sft", recipe.data, processor, seed=recipe.seed)    # None: a source cannot be fingerprinted
    path = plan_path(cache_dir, "sft", key)
    hit = load_plan(path)                # CachedPlan(table, skipped) or None (missing, corrupt, or an image changed)
    save_plan(path, table, skipped, key_fields)

What is cached: the planned samples after length planning and decoding before training (data.plan_table.PlanTable:
adapted rows, token counts, image sizes, in order), the rows left out on the way (replayed into the stage's
SkipCounter, so summary.json counts them as the run that computed the plan did), and the size and modification time
of every image file the plan uses (`image_paths`).

The key is a sha256 over everything that shapes the plan:
- each source's recipe fields (format, path, split, config, revision, columns, image_root, weight, limit, streaming)
  and its **fingerprint**: for a local file, its resolved path, size and modification time (ns); for a local
  folder, the same for every file under it. Not a content hash: reading a million-row file end to end costs as
  much as a good part of planning it, and a file rewritten by any editor, `cp` or a download gets a new mtime. A
  tool that restores an old mtime on a same-size file (`cp -p`, `rsync -t` of an edited copy) defeats it: delete
  `runs/.cache/plans/` (or the one file) after such a change. A source that is not a local path (a hub dataset
  id) has no fingerprint here, and its stage is planned every run (as is a streaming source);
- the stage, the seed (the mixing order of several sources), `data.max_length`, `on_overlong`, `on_bad_sample`,
  `max_image_pixels`;
- the processor: a hash of the tokenizer (its whole serialised vocabulary, merges and special tokens), the chat
  template, and the image processor's settings (num_crops and the rest), since they decide every token count;
- `PLAN_FORMAT`, bumped when the planning code or this file's layout changes.

Images are not part of the key (there may be millions): the cache stores each distinct image file's size and mtime,
and a load re-stats them (one stat per distinct file, about 2 us each on a local disk); any change and the whole
plan is recomputed, with a log line saying how many files changed. Images stored inside the rows (bytes) are part
of the source file, so its fingerprint covers them.

Writes are atomic (a temporary file in the same folder, fsynced, then renamed), by rank 0 only. A file that cannot
be read back (truncated, not a zip, a missing or inconsistent array, another format version) is reported with a
warning and recomputed, never trusted. Loading never unpickles (`numpy.load(allow_pickle=False)`). The newest
`KEEP_PLANS` files are kept, older ones deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.plan_table import PlanTable
from data.sample import DataError, Origin
from rundir.layout import CACHE, PLANS_DIR  # caches written inside a dataset folder are not the dataset

logger = logging.getLogger(__name__)

PLAN_FORMAT = 1
KEEP_PLANS = 8
META = "meta"


# ------------------------------------------------------------------------------------------------ the key


def _file_stat(path: Path) -> list:
    status = path.stat()
    return [str(path), status.st_size, status.st_mtime_ns]


def source_fingerprint(source) -> list | None:
    """[resolved path, size, mtime_ns] per file of a local source (a file, or every file under a folder, sorted);
    None for a source that is not a local path or is streamed (see the module docstring)."""
    if getattr(source, "streaming", False) or not source.path:
        return None
    path = Path(source.path)
    if not path.exists():
        return None
    path = path.resolve()
    if path.is_file():
        return [_file_stat(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and CACHE not in p.relative_to(path).parts)
    return [_file_stat(p) for p in files]


def processor_fingerprint(processor) -> str:
    """sha256 of what decides token counts: the serialised tokenizer, the chat template, the image processor."""
    digest = hashlib.sha256()
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode()
    )
    digest.update(
        str(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", "")).encode()
    )
    image_processor = getattr(processor, "image_processor", None)
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def key_fields(sources, stage: str, data, processor, *, seed: int) -> dict | None:
    """Everything that shapes the plan (see the module docstring), or None when a source has no fingerprint."""
    described = []
    for source in sources:
        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            return None
        described.append({"source": dataclasses.asdict(source), "files": fingerprint})
    return {
        "format": PLAN_FORMAT,
        "stage": stage,
        "seed": seed,
        "sources": described,
        "max_length": data.max_length,
        "on_overlong": data.on_overlong,
        "on_bad_sample": data.on_bad_sample,
        "max_image_pixels": data.max_image_pixels,
        "processor": processor_fingerprint(processor),
    }


def plan_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def plan_path(cache_dir: Path, stage: str, key: str) -> Path:
    return Path(cache_dir) / PLANS_DIR / f"{stage}-{key}.npz"


# ------------------------------------------------------------------------------------------------ images


def image_paths(planned) -> list[str]:
    """The distinct image files (paths, in first-use order) of planned samples."""
    paths: dict[str, None] = {}
    for plan in planned:
        for ref in (*plan.sample.images, *(getattr(plan.sample, "rejected_images", None) or ())):
            if ref.path is not None:
                paths.setdefault(str(ref.path))
    return list(paths)


def _stat_all(paths: list[str]) -> np.ndarray:
    stats = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            status = os.stat(path)
        except OSError:
            continue
        stats[i] = (status.st_size, status.st_mtime_ns)
    return stats


# ------------------------------------------------------------------------------------------------ save / load


@dataclass(frozen=True)
class CachedPlan:
    table: PlanTable
    skipped: list[tuple[str, int, str, str]]
    """(dataset, row, field, problem) of each row left out while planning, in the order they were recorded."""

    def replay_skips(self, skips) -> None:
        for dataset, row, field, problem in self.skipped:
            skips.record(DataError(Origin(dataset=dataset, row=row), field, problem))


def save_plan(
    path: Path, table: PlanTable, skipped: list[tuple[str, int, str, str]], fields: dict, images: list[str]
) -> None:
    """Write atomically (see the module docstring); a failure to write is a warning, not an error (the plan in
    memory is complete; only the next run loses the shortcut)."""
    try:
        stats = _stat_all(images)
        meta = {
            "format": PLAN_FORMAT,
            "key": plan_key(fields),
            "fields": fields,
            "datasets": table.datasets,
            "skipped": [list(s) for s in skipped],
            "image_paths": images,
            "data_fingerprint": table.data_fingerprint(),
        }
        arrays = {
            **table.arrays(),
            "image_stats": stats,
            META: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **arrays)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info(
            "plan cache: wrote %d planned samples to %s (%.0f MB)",
            len(table),
            path,
            path.stat().st_size / 1e6,
        )
        _prune(path.parent)
    except OSError as error:
        logger.warning("plan cache: %s not written (%s); the next run plans again", path, error)


def _prune(folder: Path) -> None:
    plans = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in plans[KEEP_PLANS:]:
        old.unlink(missing_ok=True)


def load_plan(path: Path, key: str) -> CachedPlan | None:
    """The cached plan at `path`, or None: missing, unreadable or inconsistent (a warning), made for another key,
    or an image file changed since (a log line)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop(META).tobytes())
        if meta.get("format") != PLAN_FORMAT or meta.get("key") != key:
            raise ValueError(
                f"format {meta.get('format')} / key {meta.get('key')} is not {PLAN_FORMAT} / {key}"
            )
        stats = arrays.pop("image_stats")
        paths = meta["image_paths"]
        if stats.shape != (len(paths), 2):
            raise ValueError("image stats do not match the image paths")
        table = PlanTable(meta["datasets"], arrays, fingerprint=meta["data_fingerprint"])
        skipped = [(str(d), int(r), str(f), str(p)) for d, r, f, p in meta["skipped"]]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        logger.warning(
            "plan cache: %s cannot be used (%s: %s); planning again", path, type(error).__name__, error
        )
        return None
    changed = int(np.sum(np.any(_stat_all(paths) != stats, axis=1)))
    if changed:
        logger.info(
            "plan cache: %d of %d image files changed since %s was written; planning again",
            changed,
            len(paths),
            path.name,
        )
        return None
    return CachedPlan(table=table, skipped=skipped)
