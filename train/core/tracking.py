"""Trackers (TensorBoard, W&B) and what the loop counts for them.

One tracker run per stage, started when the stage opens (before the base eval, so that it is logged too) and
written inside the run directory (`rundir.layout`: `<run>/logs/`):

- TensorBoard: `<run>/logs/tensorboard/<stage>/`; point TensorBoard at `<run>/logs/tensorboard` to see the stages
  side by side, each on its own step axis.
- W&B: one run per stage, named `<run name>/<stage>`, grouped by the run name (`group`), `job_type` the stage, its
  files under `<run>/logs/wandb/`; its id is kept in the run directory, so a resumed stage continues its W&B run
  (`resume="allow"`) rather than starting a new one.

Steps are each stage's own optimizer steps: the base eval is logged at SFT's step 0, the end-of-stage eval at the
stage's last step, DPO's evals at DPO's steps (its step 1 is DPO's first step, not SFT's last + 1). Separate runs
rather than one global step: a DPO stage may start from another run's SFT (`dpo.from_sft`) or from the base, and
resuming a stage never has to know how many steps another stage took.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from config import Recipe, recipe_to_dict
from config.parse import redact_secrets
from data.render import IGNORE_INDEX
from rundir.atomic import write_text_atomically
from rundir.layout import tensorboard_dir, wandb_dir, wandb_id_file

DEFAULT_PROJECT = "phi3v-tune"


def run_name(recipe: Recipe, run_dir: Path) -> str:
    return recipe.logging.run_name or Path(run_dir).name


def make_trackers(recipe: Recipe, run_dir: Path, stage: str) -> list[GeneralTracker]:
    """The recipe's trackers for one stage, writing inside the run directory (started by `start`)."""
    trackers: list[GeneralTracker] = []
    if "tensorboard" in recipe.logging.report_to:
        folder = tensorboard_dir(run_dir, stage)
        trackers.append(TensorBoardTracker(folder.name, folder.parent))
    if "wandb" in recipe.logging.report_to:
        name = run_name(recipe, run_dir)
        trackers.append(
            WandBTracker(
                recipe.logging.project or DEFAULT_PROJECT,
                name=f"{name}/{stage}",
                group=name,
                job_type=stage,
                dir=str(wandb_dir(run_dir)),
            )
        )
    return trackers


def start(accelerator, recipe: Recipe, run_dir: Path, stage: str) -> None:
    """Start the accelerator's trackers (`make_trackers`) with the flattened recipe as their config; a resumed
    stage continues its W&B run (`wandb_run_id`)."""
    if not recipe.logging.report_to:
        return
    if accelerator.is_main_process and "wandb" in recipe.logging.report_to:
        wandb_dir(run_dir).mkdir(
            parents=True, exist_ok=True
        )  # W&B falls back to a temp folder when it is absent
        run_id = wandb_run_id(run_dir, stage, resume=recipe.train.resume)
        for tracker in accelerator.log_with:
            if isinstance(tracker, WandBTracker):
                tracker.init_kwargs.update(id=run_id, resume="allow")
    accelerator.init_trackers(recipe.logging.project or DEFAULT_PROJECT, config=flat_config(recipe))


def wandb_run_id(run_dir: Path, stage: str, *, resume: bool) -> str:
    """The stage's W&B run id: the recorded one when the stage resumes (its W&B run goes on from where it stopped,
    nothing logged twice), else a new one, recorded for a later resume."""
    path = wandb_id_file(run_dir, stage)
    if resume and path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:16]
    write_text_atomically(path, run_id + "\n")
    return run_id


def flat_config(recipe: Recipe) -> dict:
    """The recipe, secrets redacted, flattened to dotted keys (what trackers accept)."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", redact_secrets(recipe_to_dict(recipe)))
    return out


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(tokens, supervised tokens) of a batch. Tokens: every position the model computes, padding excluded (the
    attention mask's ones; a packed batch has no padding), image slots included; a DPO batch counts its chosen and
    rejected rows once each (the reference pass over the same rows is not counted again). Supervised: the positions
    whose next token has a label (what the SFT loss averages over; a DPO batch's completion tokens)."""
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return tokens, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
