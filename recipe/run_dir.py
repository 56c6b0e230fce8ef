"""The run directory: the one module that knows its layout, which weights each stage holds, and how files in it are
written (atomically). Every stage, the eval CLI and export ask it; no other module spells a path of the layout.

    <run>/
      run.lock                    while a launch or stage writes here: its host, pid, start, command, lease
                                  (recipe/run_lock.py: one writer per run directory)
      recipe.resolved.yaml        every value the run used, with where each came from (load_recipe reads it back)
      env.json                    package versions, git commit, interpreter, machine, seed
      base/                       the demo's tiny base model (a hub-layout checkpoint), written by the first stage
      sft/ dpo/                   one folder per training stage:
        checkpoints/step-NNNNNNNN resumable checkpoints (train/checkpoint.py), each with its manifest.json;
                   .failed-step-N one that failed its manifest on resume (kept, never resumed)
        adapter/                  the trained LoRA adapter (PEFT layout), or
        merged/                   the whole model in the hub layout (full fine-tuning, or the export of the adapter);
                                  both with a manifest.json of their weight files (recipe/manifest.py)
        summary.json              steps, units, samples, seconds, skipped rows, the logged history, validation
        validation.jsonl          the SFT validation loss on data.eval, one line per evaluation (resume keeps it)
      dpo/start.json              what DPO (grpo/start.json: GRPO) started from: base, revision, adapters, the sha256
                                  of each weight file
      dpo/preference_eval.json    held-out preference accuracy and margin, DPO's policy and its SFT start
      dpo/ref_logps.json          the fields of the precomputed reference log-probs' cache key
      eval/results.json           every scored stage's metrics per task
      eval/predictions/<stage>/<task>.jsonl   each example's prompt, references, prediction and score
      eval/report.html            the report (eval/report.py)
      eval/cache/                 the base model's predictions, cached by what they depend on
      eval/during_training.jsonl  the scores of eval.every_steps
    runs/.cache/                  shared by the runs beside this one: images known to decode, ref_logps/<key>
      logs/                       tracker files: tensorboard/<stage>/ (event files), wandb/ (W&B's run folders),
                                  wandb-<stage>.id (the stage's W&B run id, continued on resume);
                                  rank-<r>.log: each rank's log of each stage
      diagnostics/rank-<r>.txt    each rank's Python stacks, written on SIGUSR1, by the step watchdog (a step that
                                  outlasts the collective timeout) and when a collective fails

`stage_weights(run_dir, stage)` is the one answer to "which weights are this run's SFT (or DPO) model": a stage's
adapter over the weights it started from (exact: merged in float32 when loaded), else its `merged/` checkpoint
(a stage trained in full). DPO's starting point is read from `dpo/start.json`, never guessed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

from models.adapters import (  # an adapter folder's own files
    ADAPTER_CONFIG,
)
from recipe.manifest import ManifestError, file_sha256, read_manifest, verify_manifest, write_manifest
from recipe.parse import load_recipe, resolved_yaml
from recipe.schema import ModelSection, Recipe

RESOLVED_RECIPE = "recipe.resolved.yaml"
ENV_FILE = "env.json"
BASE = "base"
ADAPTER = "adapter"
MERGED = "merged"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
VALIDATION = "validation.jsonl"
START = "start.json"
EVAL = "eval"
LOGS = "logs"
CACHE = ".cache"
DIAGNOSTICS = "diagnostics"
TRAINED_STAGES = ("sft", "dpo", "grpo")
CHECKPOINT_CONFIG = "config.json"
MANIFEST = "manifest.json"
LOCK = "run.lock"
RESULTS = "results.json"
REPORT = "report.html"
PREDICTIONS = "predictions"
EVAL_CACHE = "cache"
DURING_TRAINING = "during_training.jsonl"
PREFERENCE_EVAL = "preference_eval.json"
REFERENCE_LOGPS = "ref_logps"  # the shared cache's folder, and <stage>/ref_logps.json (the key's fields)
STEP = "step-"  # a checkpoint folder: step-NNNNNNNN
WEIGHT_FILES = (
    ".safetensors",
)  # what a weights folder's manifest covers (cards and configs are rewritten later)
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


# ----------------------------------------------------------------------------------------------- paths


def lock_file(run_dir: Path) -> Path:
    """The run directory's lock: one writer at a time (recipe/run_lock.py)."""
    return Path(run_dir) / LOCK


def recipe_file(run_dir: Path) -> Path:
    return Path(run_dir) / RESOLVED_RECIPE


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage


def adapter_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / ADAPTER


def merged_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / MERGED


def checkpoints_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / CHECKPOINTS


def summary_file(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / SUMMARY


def start_file(run_dir: Path, stage: str = "dpo") -> Path:
    return Path(run_dir) / stage / START


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def results_file(run_dir: Path) -> Path:
    """Every scored stage's metrics per task (eval/hook.py writes it)."""
    return eval_dir(run_dir) / RESULTS


def report_file(run_dir: Path) -> Path:
    return eval_dir(run_dir) / REPORT


def predictions_file(run_dir: Path, stage: str, task: str) -> Path:
    """One line per example: prompt, references, prediction, score (eval/report.py)."""
    return eval_dir(run_dir) / PREDICTIONS / stage / f"{task}.jsonl"


def eval_cache_dir(run_dir: Path) -> Path:
    """The base model's predictions, cached by what they depend on (eval/hook.py)."""
    return eval_dir(run_dir) / EVAL_CACHE


def during_training_file(run_dir: Path) -> Path:
    """Scores of `eval.every_steps`, one line per evaluation."""
    return eval_dir(run_dir) / DURING_TRAINING


def preference_eval_file(run_dir: Path, stage: str = "dpo") -> Path:
    """Held-out preference accuracy and margin of the stage's policy and of the one it started from."""
    return Path(run_dir) / stage / PREFERENCE_EVAL


def reference_logps_file(run_dir: Path, key: str) -> Path:
    """Precomputed DPO reference log-probs, shared by the runs next to this one (`runs/.cache/ref_logps/`)."""
    return cache_dir(Path(run_dir).resolve()) / REFERENCE_LOGPS / f"{key}.safetensors"


def reference_record_file(run_dir: Path, stage: str = "dpo") -> Path:
    """The fields of the reference log-probs' cache key the stage used (a resume must match them)."""
    return Path(run_dir) / stage / f"{REFERENCE_LOGPS}.json"


def checkpoint_name(step: int) -> str:
    return f"{STEP}{step:08d}"


def logs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LOGS


def cache_dir(run_dir: Path) -> Path:
    """Caches shared by the runs next to this one (`runs/.cache/`): e.g. the images known to decode
    (data/validate.py)."""
    return Path(run_dir).parent / CACHE


def rank_log_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank-{rank}.log"


def diagnostics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DIAGNOSTICS


def diagnostics_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / DIAGNOSTICS / f"rank-{rank}.txt"


def tensorboard_dir(run_dir: Path, stage: str) -> Path:
    """A stage's TensorBoard event files: one TensorBoard run per stage, `<run>/logs/tensorboard/<stage>`."""
    return logs_dir(run_dir) / "tensorboard" / stage


def wandb_id_file(run_dir: Path, stage: str) -> Path:
    """The W&B run id of a stage (`<run>/logs/wandb-<stage>.id`): a resumed stage continues that W&B run."""
    return logs_dir(run_dir) / f"wandb-{stage}.id"


def wandb_dir(run_dir: Path) -> Path:
    """What W&B is given as `dir`: it writes its run folders under `<this>/wandb/` (`<run>/logs/wandb/`)."""
    return logs_dir(run_dir)


def validation_file(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / VALIDATION


def base_path(model: ModelSection, run_dir: Path) -> str:
    """Where a run's base weights are: the hub id or folder of the recipe, or run_dir/base for the demo's `tiny`."""
    return str(Path(run_dir) / BASE) if model.name_or_path == "tiny" else model.name_or_path


def is_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_CONFIG).is_file()


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def is_run_dir(path: Path) -> bool:
    """A run directory holds stage folders and its resolved recipe; a checkpoint folder holds config.json."""
    path = Path(path)
    markers = (RESOLVED_RECIPE, BASE, *TRAINED_STAGES)
    return path.is_dir() and not is_checkpoint(path) and any((path / marker).exists() for marker in markers)


def resolve_output_dir(
    recipe: Recipe, recipe_path: str | Path | None, *, now: datetime | None = None
) -> Path:
    """recipe.output_dir, or runs/<recipe-name>-<YYYYmmdd-HHMMSS>/ relative to the working directory."""
    if recipe.output_dir is not None:
        return Path(recipe.output_dir)
    name = Path(recipe_path).stem if recipe_path is not None else "recipe"
    return Path("runs") / f"{name}-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def load_run_recipe(run_dir: Path) -> Recipe:
    path = recipe_file(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is no run directory: it holds no {RESOLVED_RECIPE}")
    return load_recipe(path)


# ----------------------------------------------------------------------------------------------- atomic writes


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling file, which then replaces `path` in one rename: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".tmp-{path.name}")
    write(staging)
    os.replace(staging, path)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, value) -> Path:
    return write_text_atomically(path, json.dumps(value, indent=1) + "\n")


def replace_dir_atomically(folder: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary sibling folder, which then replaces `folder` in one rename."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


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
        ):  # a resume records the recipe once the checkpoint accepted it (train/trainer.py)
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


# ----------------------------------------------------------------------------------------------- which weights


@dataclass(frozen=True, kw_only=True)
class Weights:
    """A model as loadable parts: `base` (hub id or folder, at `revision`), then each adapter merged in order."""

    base: str
    revision: str | None = None
    adapters: tuple[Path, ...] = ()

    def describe(self) -> str:
        return self.base + "".join(f" + {adapter}" for adapter in self.adapters)


def manifest_file(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def write_folder_manifest(folder: Path, suffixes: tuple[str, ...] = ("",)) -> Path:
    """`folder/manifest.json`: each file's path, size and sha256 (recipe/manifest.py), written after them."""
    return write_manifest(folder, manifest_file(folder), suffixes)


def write_weights_manifest(folder: Path) -> Path:
    """The manifest of an adapter or merged folder: its weight files (model cards and configs change after)."""
    return write_folder_manifest(folder, WEIGHT_FILES)


def verify_folder(folder: Path, closed: tuple[str, ...] = ()) -> dict[str, dict]:
    """Raise ManifestError naming the first file of `folder` that is not as its manifest records."""
    return verify_manifest(folder, manifest_file(folder), closed)


def verify_weights(weights: Weights) -> Weights:
    """`weights`, once every local folder of it that holds a manifest (this project's adapters and merged models)
    passed it: a weight file cut short or changed is refused before it is loaded."""
    for folder in (Path(weights.base), *weights.adapters):
        if manifest_file(folder).is_file():
            try:
                verify_folder(folder)
            except ManifestError as error:
                raise ManifestError(
                    f"refusing to load {folder}: {error}. Fix: restore the folder from a copy, or "
                    "train the stage again"
                ) from None
    return weights


def base_weights(run_dir: Path, recipe: Recipe | None = None) -> Weights:
    """The weights the run's first stage started from."""
    recipe = recipe or load_run_recipe(run_dir)
    if recipe.model.name_or_path == "tiny" and not is_checkpoint(Path(run_dir) / BASE):
        raise FileNotFoundError(
            f"{run_dir} has no {BASE}/ checkpoint, and the recipe's model is 'tiny' (built with random weights when a "
            "run starts): the weights the run trained on are not available. Fix: pass the run directory that holds "
            f"{BASE}/"
        )
    return recipe_base(recipe, run_dir)


def recipe_base(recipe: Recipe, run_dir: Path) -> Weights:
    """The recipe's base model as this run loads it (the demo's `tiny` from run_dir/base, built by the first stage)."""
    revision = None if recipe.model.name_or_path == "tiny" else recipe.model.revision
    return Weights(base=base_path(recipe.model, run_dir), revision=revision)


def stage_weights(run_dir: Path, stage: str, recipe: Recipe | None = None) -> Weights:
    """The weights of `stage` ('base', 'sft' or 'dpo') of a run: its adapter over what it started from, else its
    merged checkpoint. DPO started from what `dpo/start.json` records. Each folder's manifest, where it has one, is
    verified first (`verify_weights`)."""
    run_dir = Path(run_dir)
    if stage == "base":
        return base_weights(run_dir, recipe)
    adapter, merged = adapter_dir(run_dir, stage), merged_dir(run_dir, stage)
    if is_adapter(adapter):
        start = base_weights(run_dir, recipe) if stage == "sft" else read_start(run_dir, stage)
        return verify_weights(
            Weights(base=start.base, revision=start.revision, adapters=(*start.adapters, adapter))
        )
    if is_checkpoint(merged):
        return verify_weights(Weights(base=str(merged)))
    raise FileNotFoundError(
        f"{run_dir} has no {stage} model: neither {adapter} nor {merged} holds weights. Fix: run "
        f"the {stage} stage, or pick another stage"
    )


def latest_stage(run_dir: Path) -> str:
    """The last trained stage of a run ('dpo', 'sft'), or 'base'."""
    for stage in reversed(TRAINED_STAGES):
        if is_adapter(adapter_dir(run_dir, stage)) or is_checkpoint(merged_dir(run_dir, stage)):
            return stage
    return "base"


def dpo_start(recipe: Recipe, run_dir: Path) -> Weights:
    """What DPO starts from: `dpo.from_sft` (an SFT run directory, an adapter folder or a checkpoint), else this run's
    SFT model when its stages include sft, else the base."""
    if recipe.dpo.from_sft is None:
        return (
            stage_weights(run_dir, "sft", recipe) if "sft" in recipe.stages else recipe_base(recipe, run_dir)
        )
    source = Path(recipe.dpo.from_sft)
    if is_run_dir(source):
        return stage_weights(source, "sft")
    if is_adapter(source):  # <sft run>/sft/adapter, or a lone adapter over this recipe's base
        sft_run = source.parent.parent
        base = base_weights(sft_run) if recipe_file(sft_run).is_file() else recipe_base(recipe, run_dir)
        return verify_weights(Weights(base=base.base, revision=base.revision, adapters=(source,)))
    if is_checkpoint(source):
        return verify_weights(Weights(base=str(source)))
    raise FileNotFoundError(
        f"dpo.from_sft = {str(source)!r} holds no SFT model (no {ADAPTER_CONFIG} or "
        f"{CHECKPOINT_CONFIG}, and no run directory): point it at the SFT run directory or its "
        "adapter"
    )


def weights_sha256(folder: Path) -> dict[str, str]:
    """{file name: sha256} of every weight file of an adapter or merged folder: an adapter's
    `adapter_model.safetensors` (LoRA) and `full_weights.safetensors` (the parts trained in full, e.g. the projector).
    Read from the folder's manifest when it has one (`verify_weights` checked it against the files), else hashed."""
    folder = Path(folder)
    if manifest_file(folder).is_file():
        files = read_manifest(manifest_file(folder))
        return {rel: entry["sha256"] for rel, entry in sorted(files.items()) if rel.endswith(WEIGHT_FILES)}
    return {path.name: file_sha256(path) for path in sorted(folder.glob("*.safetensors"))}


def start_weights_sha256(start: Weights) -> list[dict[str, str]]:
    """The content hash of every weight file DPO starts from: each adapter's, and the base's when it is a folder
    with a manifest (a merged SFT model): a changed projector shows as surely as a changed LoRA."""
    hashes = [weights_sha256(adapter) for adapter in start.adapters]
    if manifest_file(start.base).is_file():
        hashes.insert(0, weights_sha256(Path(start.base)))
    return hashes


def write_start(run_dir: Path, start: Weights, stage: str = "dpo") -> Path:
    """<stage>/start.json (DPO, GRPO): the starting weights, with the hash of each of their weight files (to detect
    a changed starting model, its projector included)."""
    record = {
        "base": start.base,
        "revision": start.revision,
        "adapters": [str(a) for a in start.adapters],
        "weights_sha256": start_weights_sha256(start),
    }
    return write_json_atomically(start_file(run_dir, stage), record)


def grpo_start(recipe: Recipe, run_dir: Path) -> Weights:
    """What GRPO starts from: this run's DPO model when its stages include dpo, else its SFT model when they include
    sft, else the base."""
    for stage in ("dpo", "sft"):
        if stage in recipe.stages:
            return stage_weights(run_dir, stage, recipe)
    return recipe_base(recipe, run_dir)


def read_start(run_dir: Path, stage: str = "dpo") -> Weights:
    path = start_file(run_dir, stage)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the {stage} stage records its starting point there when it starts"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    return Weights(
        base=record["base"],
        revision=record.get("revision"),
        adapters=tuple(Path(a) for a in record.get("adapters", ())),
    )
