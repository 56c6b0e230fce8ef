"""A stage's folder and the run's record: creating the folder (never over an earlier run of the stage unless the
recipe says so), the resolved recipe and `env.json` (package versions, git commit, machine), and undoing a stage
that failed before its first step, so that it leaves no half-made run directory."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from config.parse import resolved_yaml
from config.schema import Recipe
from rundir.atomic import write_file_atomically, write_json_atomically, write_text_atomically
from rundir.layout import ENV_FILE, LOCK, RESOLVED_RECIPE, recipe_file, stage_dir

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "deepspeed",
    "tokenizers",
    "safetensors",
    "pillow",
    "numpy",
    "flash-attn",
    "liger-kernel",
    "wandb",
    "tensorboard",
)


# ----------------------------------------------------------------------------------------------- a stage's folder


def prepare_stage_dir(run_dir: Path, recipe: Recipe, *, stage: str, is_main: bool) -> Path:
    """Create `run_dir/<stage>` for this stage. A stage directory that already holds files is an error unless the
    recipe says `overwrite_output_dir: true` or `train.resume: true` (resume continues it). The resolved recipe is
    written here, except on resume: the trainer writes it once the checkpoint accepted the recipe."""
    folder = stage_dir(run_dir, stage)
    if is_main:
        occupied = folder.exists() and any(folder.iterdir())
        if occupied and not (recipe.overwrite_output_dir or recipe.train.resume):
            raise FileExistsError(
                f"{folder} already holds a {stage} run; refusing to overwrite it. Choose another output_dir, "
                f"resume it with train.resume=true, or pass overwrite_output_dir=true to replace its files"
            )
        _record_stage_start(Path(run_dir), stage)
        folder.mkdir(parents=True, exist_ok=True)
        if (
            not recipe.train.resume
        ):  # a resume records the recipe once the checkpoint accepted it (train/core/trainer.py)
            record_run(run_dir, recipe)
    return folder


def record_run(run_dir: Path, recipe: Recipe) -> None:
    """recipe.resolved.yaml and env.json: the values this run uses, and where it runs."""
    write_text_atomically(recipe_file(run_dir), resolved_yaml(recipe))
    write_json_atomically(Path(run_dir) / ENV_FILE, environment(recipe.seed))


# ----------------------------------------------------------------------------------------------- a failed start


@dataclass
class _StageStart:
    """What a run directory held before a stage started in it (`prepare_stage_dir`), to undo the start."""

    run_dir: Path
    stage: str
    made_run_dir: bool
    entries_before: frozenset[str]  # top-level names in run_dir before the stage started
    files_before: dict[str, bytes | None]  # the resolved recipe and env.json as they were (None: absent)
    training: bool = False


_STAGE_STARTS: dict[tuple[Path, str], _StageStart] = {}


def _record_stage_start(run_dir: Path, stage: str) -> None:
    # A run directory that holds only the lock this stage took was made by this stage.
    existed = run_dir.is_dir() and {p.name for p in run_dir.iterdir()} - {LOCK} != set()
    _STAGE_STARTS[(run_dir.resolve(), stage)] = _StageStart(
        run_dir=run_dir,
        stage=stage,
        made_run_dir=not existed,
        entries_before=frozenset(p.name for p in run_dir.iterdir()) if existed else frozenset({LOCK}),
        files_before={
            name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None
            for name in (RESOLVED_RECIPE, ENV_FILE)
        },
    )


def mark_training_started(run_dir: Path, stage: str) -> None:
    """From here on the stage's folder is kept when the run fails (it may hold checkpoints and logs)."""
    record = _STAGE_STARTS.get((Path(run_dir).resolve(), stage))
    if record is not None:
        record.training = True


def _undo_stage_start(record: _StageStart) -> list[Path]:
    """Remove what the stage created before training (never what an earlier run wrote); restore the files it
    rewrote. Returns the removed paths."""
    run_dir = record.run_dir
    if not run_dir.is_dir():
        return []
    if record.made_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
        return [run_dir]
    removed = []
    for path in run_dir.iterdir():
        if path.name not in record.entries_before and path.name not in record.files_before:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    for name, content in record.files_before.items():
        if content is None:
            (run_dir / name).unlink(missing_ok=True)
        else:
            write_file_atomically(run_dir / name, lambda tmp, content=content: tmp.write_bytes(content))
    return removed


@contextmanager
def removed_if_failed_before_training() -> Iterator[list[Path]]:
    """Around one entry point's run: a stage that fails before `mark_training_started` leaves no half-made run
    directory (what it created is removed, the resolved recipe and env.json it rewrote are restored). The list it
    yields is filled with the removed paths."""
    before = set(_STAGE_STARTS)
    removed: list[Path] = []
    try:
        yield removed
    except BaseException:
        for key in [k for k in _STAGE_STARTS if k not in before]:
            record = _STAGE_STARTS.pop(key)
            if not record.training:
                removed.extend(_undo_stage_start(record))
        raise
    finally:
        for key in [k for k in _STAGE_STARTS if k not in before]:
            del _STAGE_STARTS[key]


def environment(seed: int) -> dict:
    """Package versions, git commit, interpreter, machine and seed: enough to reproduce or explain a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "seed": seed,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
