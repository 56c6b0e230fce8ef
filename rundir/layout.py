"""The run directory's layout: every file and folder name is a constant here and every path a function of them.
Every stage, the eval CLI, data preparation's caches and export ask this module; no other module spells a name of
the layout (tests/test_layers.py checks each constant, docs/architecture.md#run-directory lists them all).

    <run>/
      run.lock                    while a launch or stage writes here: its host, pid, start, command, lease
                                  (rundir/run_lock.py: one writer per run directory)
      recipe.resolved.yaml        every value the run used, with where each came from (load_recipe reads it back)
      env.json                    package versions, git commit, interpreter, machine, seed
      base/                       the demo's tiny base model (a hub-layout checkpoint), written by the first stage
      sft/ dpo/                   one folder per training stage:
        checkpoints/step-NNNNNNNN resumable checkpoints (train/core/checkpoint.py), each with its manifest.json;
                   .failed-step-N one that failed its manifest on resume (kept, never resumed)
        adapter/                  the trained LoRA adapter (PEFT layout), or
        merged/                   the whole model in the hub layout (full fine-tuning, or the export of the adapter);
                                  both with a manifest.json of their weight files (rundir/manifest.py)
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

Which weights a stage holds is answered by `rundir.weights.stage_weights`; how files here are written, by
`rundir.atomic`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from config.parse import load_recipe
from config.schema import ModelSection, Recipe
from models.adapters import (  # an adapter folder's own files
    ADAPTER_CONFIG,
)

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
STEP = "step-"
FAILED = ".failed-"  # a checkpoint that failed its manifest on resume: renamed .failed-step-N (kept, never resumed)
TENSORBOARD = "tensorboard"
WANDB = "wandb"  # W&B writes its run folders under <run>/logs/wandb/ (wandb_dir)
PLANS_DIR = "plans"  # <runs>/.cache/plans/<stage>-<key>.npz (data/plan_cache.py)
DECODED_IMAGES = "decoded-images.txt"  # <runs>/.cache/: fingerprints of the images known to decode  # a checkpoint folder: step-NNNNNNNN


# ----------------------------------------------------------------------------------------------- paths


def lock_file(run_dir: Path) -> Path:
    """The run directory's lock: one writer at a time (rundir/run_lock.py)."""
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
    (data/decode_check.py)."""
    return Path(run_dir).parent / CACHE


def rank_log_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank-{rank}.log"


def diagnostics_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DIAGNOSTICS


def diagnostics_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / DIAGNOSTICS / f"rank-{rank}.txt"


def tensorboard_dir(run_dir: Path, stage: str) -> Path:
    """A stage's TensorBoard event files: one TensorBoard run per stage, `<run>/logs/tensorboard/<stage>`."""
    return logs_dir(run_dir) / TENSORBOARD / stage


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
