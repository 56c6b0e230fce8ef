"""What runs around training: the eval hook (score the base before training and each stage after it, when the
recipe's stages include `eval`; eval/hook.py does the scoring, caching and report), and the callbacks the trainer
calls after each optimizer step (`callback(state, prepared_model)`): scoring every `eval.every_steps` steps, and
stopping after a given step as a preemption would."""

from __future__ import annotations

from pathlib import Path

from config import Recipe
from eval.hook import evaluate_stage, score_during_training
from models.quantization import quantization_tag
from rundir.weights import recipe_base
from train.core.model_loading import load_model


def stages_to_score(recipe: Recipe) -> tuple[str, ...]:
    if "eval" not in recipe.stages or not recipe.eval.tasks:
        return ()
    return recipe.eval.when or ("base", *[s for s in recipe.stages if s in ("sft", "dpo", "grpo")])


def run_eval_hook(
    stage: str, model, processor, recipe: Recipe, run_dir: Path, *, base_path: str, accelerator, step: int
):
    """Score `model` as `stage` ('base', 'sft' or 'dpo') and log it to the stage's trackers at `step` (the base: 0,
    SFT's first; a trained stage: its last step); a no-op when the recipe does not ask for it."""
    if stage not in stages_to_score(recipe):
        return None
    # A quantised base answers differently from the original: its cache entries are its own.
    base_id = f"{base_path}@{recipe.model.revision or 'main'}{quantization_tag(recipe.model)}"
    model_id = base_id if stage == "base" else f"{run_dir}/{stage}"
    was_training = model.training
    model.eval()
    try:
        return evaluate_stage(
            stage,
            model,
            processor,
            recipe.eval,
            run_dir,
            model_id_for_cache=model_id,
            accelerator=accelerator,
            data=recipe.data,
            step=step,
        )
    finally:
        model.train(was_training)


def score_base_before_dpo(start, model, processor, recipe: Recipe, run_dir: Path, *, accelerator) -> None:
    """A run without an SFT stage scores the base at DPO's step 0 (when the recipe scores the base): the loaded
    policy itself when DPO starts from the base, else the base loaded beside it for the eval, then freed."""
    if "base" not in stages_to_score(recipe):
        return
    if start == recipe_base(recipe, run_dir):
        model.to(accelerator.device)
        run_eval_hook(
            "base", model, processor, recipe, run_dir, base_path=start.base, accelerator=accelerator, step=0
        )
        return
    base, base_processor, base_path = load_model(
        recipe.model, run_dir, seed=recipe.seed, accelerator=accelerator
    )
    run_eval_hook(
        "base",
        base.to(accelerator.device),
        base_processor,
        recipe,
        run_dir,
        base_path=base_path,
        accelerator=accelerator,
        step=0,
    )
    del base


def eval_every_steps(stage: str, processor, recipe: Recipe, run_dir: Path, *, accelerator, total_steps: int):
    """A callback scoring the training model every `eval.every_steps` steps, except at `total_steps` (the
    end-of-stage hook scores that one); None when the recipe does not ask for it."""
    every = recipe.eval.every_steps
    if not every or not stages_to_score(recipe):
        return None
    examples_by_task: dict = {}

    def on_step(state, model) -> None:
        if state.step % every or state.step == total_steps:
            return
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            score_during_training(
                stage,
                state.step,
                unwrapped,
                processor,
                recipe.eval,
                run_dir,
                accelerator=accelerator,
                data=recipe.data,
                examples_by_task=examples_by_task,
            )
        finally:
            unwrapped.train()

    return on_step


class Preempted(RuntimeError):
    """Raised by `stop_after` after the given step (and its checkpoint), as a preemption would end a run."""


def stop_after(step: int | None):
    """A callback that ends the run after `step` optimizer steps; None for no limit."""
    if step is None:
        return None

    def on_step(state, model) -> None:
        if state.step >= step:
            raise Preempted(f"stopped after step {state.step} (stop_after_step={step})")

    return on_step
