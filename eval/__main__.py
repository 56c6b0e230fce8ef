"""Score a model on the recipe's eval tasks and print the scores of every stage.

    python -m eval recipes/demo.yaml --model runs/demo-20260101-120000                  # the run's latest stage
    python -m eval recipes/demo.yaml --model runs/demo-20260101-120000 --stage base
    python -m eval recipes/chartqa.yaml --model microsoft/Phi-3.5-vision-instruct --task chartqa --limit 200
    python -m eval recipes/chartqa.yaml --model microsoft/Phi-3.5-vision-instruct --adapter runs/x/sft/adapter
    accelerate launch -m eval recipes/chartqa.yaml --model ...                          # generation sharded

`--model` is a run directory, a checkpoint folder or a hub id. In a run directory the base weights are `base/` when
it holds a checkpoint (the demo's tiny model), else the recipe's `model.name_or_path`; a stage is its `merged/`
checkpoint when there is one, else its `adapter/` over the stages before it (DPO trains on the SFT model with its
adapter merged, DESIGN.md decision 5; with `dpo.from_sft` the SFT weights come from there). Scores are written to
`<run dir>/eval/` (a run directory) or `--output-dir` and merged with the stages scored before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from eval.hook import EvalGateError, evaluate_stage
from eval.report import STAGES, eval_dir
from eval.tasks import TASKS
from train.recipe import load_recipe, resolve_output_dir
from train.recipe_schema import Recipe

ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_CONFIG = "config.json"
RUN_DIR_MARKERS = ("recipe.resolved.yaml", "base", "sft", "dpo")


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """What to load: `weights` through models.load, then each adapter in order (all but the last merged)."""

    weights: str
    adapters: tuple[Path, ...] = ()
    stage: str
    run_dir: Path | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the YAML recipe (a run's recipe.resolved.yaml works too)")
    parser.add_argument("--model", required=True, help="a run directory, a checkpoint folder or a hub id")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter folder to apply (replaces the stage's adapter)")
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="score this task (repeatable); "
                        "default: the recipe's eval.tasks")
    parser.add_argument("--limit", type=int, help="score at most this many examples per task (eval.limit)")
    parser.add_argument("--stage", choices=STAGES, help="which stage the model is (default: a run directory's "
                        "latest stage; otherwise sft with --adapter, else base)")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                        help="read TASK from a local file or folder (repeatable)")
    parser.add_argument("--output-dir", type=Path, help="where eval/ goes (default: the run directory, else the "
                        "recipe's output_dir, else runs/<recipe name>-<time>)")
    return parser.parse_args(argv)


def task_paths(pairs: Sequence[str]) -> dict[str, str]:
    paths = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"--data {pair!r} is not TASK=PATH; write e.g. --data chartqa=charts.parquet")
        paths[task] = path
    return paths


# ------------------------------------------------------------------------------------------------ the model


def is_run_dir(path: Path) -> bool:
    """A run directory holds stage folders and its resolved recipe; a checkpoint folder holds config.json."""
    return path.is_dir() and not (path / CHECKPOINT_CONFIG).is_file() and any(
        (path / marker).exists() for marker in RUN_DIR_MARKERS)


def _is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_CONFIG).is_file()


def _is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def _stage_exists(run_dir: Path, stage: str) -> bool:
    return _is_checkpoint(run_dir / stage / "merged") or _is_adapter(run_dir / stage / "adapter")


def latest_stage(run_dir: Path) -> str:
    return next((stage for stage in ("dpo", "sft") if _stage_exists(run_dir, stage)), "base")


def _base_weights(run_dir: Path, recipe: Recipe) -> str:
    if _is_checkpoint(run_dir / "base"):
        return str(run_dir / "base")
    if recipe.model.name_or_path == "tiny":
        raise ValueError(f"{run_dir} has no base/ checkpoint, and the recipe's model is 'tiny' (built with random "
                         "weights when a run starts): the weights the run trained on are not available. Fix: pass "
                         "the run directory that holds base/")
    return recipe.model.name_or_path


def _sft_weights(source: Path) -> tuple[str | None, tuple[Path, ...]]:
    """(merged checkpoint or None, adapters) of an SFT result named by `dpo.from_sft`: an adapter folder, a
    checkpoint folder, or a run directory holding sft/."""
    for folder in (source, source / "sft" / "merged", source / "sft" / "adapter"):
        if _is_checkpoint(folder):
            return str(folder), ()
        if _is_adapter(folder):
            return None, (folder,)
    raise ValueError(f"dpo.from_sft = {str(source)!r} holds no SFT model (no {ADAPTER_CONFIG} or {CHECKPOINT_CONFIG} "
                     "there or under sft/merged, sft/adapter); the DPO adapter cannot be applied to the right weights. "
                     "Fix: point dpo.from_sft at the SFT run directory or its adapter")


def run_dir_plan(run_dir: Path, recipe: Recipe, *, stage: str | None, adapter: Path | None) -> ModelPlan:
    """The weights of `stage` (default: the latest) of a run, each stage over the ones before it."""
    stage = stage or latest_stage(run_dir)
    weights, adapters = _base_weights(run_dir, recipe), []
    if stage == "dpo" and not _stage_exists(run_dir, "sft") and recipe.dpo.from_sft:
        merged, adapters_before = _sft_weights(Path(recipe.dpo.from_sft))
        weights, adapters = merged or weights, list(adapters_before)
    for step in STAGES[1:STAGES.index(stage) + 1]:
        merged, stage_adapter = run_dir / step / "merged", run_dir / step / "adapter"
        if step == stage and adapter is not None:
            adapters.append(adapter)
        elif _is_checkpoint(merged):
            weights, adapters = str(merged), []  # a merged checkpoint holds every stage before it
        elif _is_adapter(stage_adapter):
            adapters.append(stage_adapter)
        elif step == stage:
            raise ValueError(f"{run_dir} has no {stage} model: neither {merged} nor {stage_adapter} exists. Fix: "
                             f"run the {stage} stage, or pick another with --stage")
    return ModelPlan(weights=weights, adapters=tuple(adapters), stage=stage, run_dir=run_dir)


def plan_model(model: str, recipe: Recipe, *, stage: str | None, adapter: Path | None) -> ModelPlan:
    if adapter is not None and not _is_adapter(adapter):
        raise ValueError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; pass a PEFT adapter folder")
    if stage == "base" and adapter is not None:
        raise ValueError("--stage base with --adapter: the base model has no adapter; drop one of them")
    if is_run_dir(Path(model)):
        return run_dir_plan(Path(model), recipe, stage=stage, adapter=adapter)
    return ModelPlan(weights=model, adapters=(adapter,) if adapter else (), stage=stage or ("sft" if adapter else "base"))


def load_planned(plan: ModelPlan, recipe: Recipe):
    """(model in eval mode, processor): the weights, then the adapters (all but the last merged, the last kept as a
    PeftModel, as the training-time eval scores it)."""
    from peft import PeftModel

    revision = recipe.model.revision if plan.weights == recipe.model.name_or_path else None
    model, processor = models.load(plan.weights, revision=revision, dtype=recipe.model.dtype,
                                   attn_implementation=recipe.model.attn_implementation,
                                   num_crops=recipe.model.num_crops)
    for index, adapter in enumerate(plan.adapters):
        model = PeftModel.from_pretrained(model, str(adapter))
        if index < len(plan.adapters) - 1:
            model = model.merge_and_unload()
    return model.eval(), processor


def model_id_for_cache(plan: ModelPlan, recipe: Recipe) -> str:
    """The base's id the way the training-time hook spells it, so that both share base cache entries."""
    if plan.stage == "base" and not plan.adapters:
        return f"{plan.weights}@{recipe.model.revision or 'main'}"
    return "+".join([plan.weights, *map(str, plan.adapters)])


# ------------------------------------------------------------------------------------------------ the table


def results_table(run_dir: Path, tasks: Sequence[str]) -> str:
    """One row per task and metric, one column per stage (blank where not scored)."""
    results = json.loads((eval_dir(run_dir) / "results.json").read_text(encoding="utf-8"))
    header = ["task", "metric", *STAGES]
    rows = [[task, metric, *(f"{by_stage[s]:.4f}" if s in by_stage else "" for s in STAGES)]
            for task in tasks for metric, by_stage in results.get(task, {}).items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _accelerator():
    """An Accelerator under `accelerate launch` with several processes (generation is sharded), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe)
    recipe_eval = dataclasses.replace(recipe.eval, tasks=tuple(args.task or recipe.eval.tasks),
                                      limit=args.limit if args.limit is not None else recipe.eval.limit)
    if not recipe_eval.tasks:
        raise ValueError(f"{args.recipe}: eval.tasks is empty and no --task is given; nothing to score")
    plan = plan_model(args.model, recipe, stage=args.stage, adapter=args.adapter)
    run_dir = args.output_dir or plan.run_dir or resolve_output_dir(recipe, args.recipe)
    model, processor = load_planned(plan, recipe)
    accelerator = _accelerator()
    model.to(accelerator.device if accelerator else "cuda" if torch.cuda.is_available() else "cpu")
    failure = None
    try:
        evaluate_stage(plan.stage, model, processor, recipe_eval, run_dir, model_id_for_cache=model_id_for_cache(
            plan, recipe), accelerator=accelerator, data=recipe.data, task_paths=task_paths(args.data))
    except EvalGateError as error:
        failure = error
    if accelerator is None or accelerator.is_main_process:
        print(f"{plan.stage} model: {plan.weights}" + "".join(f" + {adapter}" for adapter in plan.adapters))
        print(results_table(run_dir, recipe_eval.tasks))
        print(f"report: {eval_dir(run_dir) / 'report.html'}")
        if failure is not None:
            print(failure, file=sys.stderr)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # a bad recipe, model path or dataset row: the message says what to fix
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
