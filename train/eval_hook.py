"""The eval hook as the training stages call it: score the base before training and each stage after it, when the
recipe's stages include `eval` (eval/hook.py does the scoring, the caching and the report)."""

from __future__ import annotations

from pathlib import Path

from .recipe_schema import Recipe


def stages_to_score(recipe: Recipe) -> tuple[str, ...]:
    if "eval" not in recipe.stages or not recipe.eval.tasks:
        return ()
    return recipe.eval.when or ("base", *[s for s in recipe.stages if s in ("sft", "dpo")])


def run_eval_hook(stage: str, model, processor, recipe: Recipe, run_dir: Path, *, base_path: str, accelerator):
    """Score `model` as `stage` ('base', 'sft' or 'dpo'); a no-op when the recipe does not ask for it."""
    if stage not in stages_to_score(recipe):
        return None
    from eval.hook import evaluate_stage

    model_id = f"{base_path}@{recipe.model.revision or 'main'}" if stage == "base" else f"{run_dir}/{stage}"
    was_training = model.training
    model.eval()
    try:
        return evaluate_stage(stage, model, processor, recipe.eval, run_dir, model_id_for_cache=model_id,
                              accelerator=accelerator, data=recipe.data)
    finally:
        model.train(was_training)


def every_steps_callback(stage: str, model, processor, recipe: Recipe, run_dir: Path, *, accelerator):
    """An `on_step` callback scoring the training model every `eval.every_steps` steps (not at the last step: the
    end-of-stage hook scores that); None when the recipe does not ask for it."""
    every = recipe.eval.every_steps
    if not every or not stages_to_score(recipe):
        return None
    from eval.hook import score_during_training

    examples_by_task: dict = {}
    total = {"sft": recipe.train.max_steps, "dpo": recipe.dpo.max_steps or recipe.train.max_steps}[stage]

    def on_step(state) -> None:
        if state.step % every or state.step == total:
            return
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            score_during_training(stage, state.step, unwrapped, processor, recipe.eval, run_dir,
                                  accelerator=accelerator, data=recipe.data, examples_by_task=examples_by_task)
        finally:
            unwrapped.train()

    return on_step
