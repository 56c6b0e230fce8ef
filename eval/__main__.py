"""Score a model on the recipe's eval tasks and print the scores of every stage.

    python -m eval recipes/demo.yaml --model runs/demo-20260101-120000                  # the run's latest stage
    python -m eval recipes/demo.yaml --model runs/demo-20260101-120000 --stage base
    python -m eval recipes/chartqa.yaml --model microsoft/Phi-3.5-vision-instruct --task chartqa --limit 200
    python -m eval recipes/chartqa.yaml --model microsoft/Phi-3.5-vision-instruct --adapter my_adapter/
    accelerate launch -m eval recipes/chartqa.yaml --model ...                          # generation sharded

`--model` is a run directory, a checkpoint folder or a hub id. In a run directory a stage's weights are what
`rundir.weights.stage_weights` says, the same answer DPO and export get: the stage's adapter over what it started
from (the base for SFT, the starting point DPO recorded for DPO), else its `merged/` checkpoint. Scores are written to
`<run dir>/eval/` (a run directory) or `--output-dir` and merged with the stages scored before.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from config import Recipe, load_recipe
from eval.hook import EvalGateError, evaluate_stage
from eval.report import STAGES
from eval.summary import results_table
from eval.tasks import TASKS
from rundir.layout import ADAPTER_CONFIG, is_adapter, is_run_dir, report_file, resolve_output_dir
from rundir.weights import Weights, base_weights, latest_stage, read_start, stage_weights, verify_weights
from runtime.user_errors import run_main


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """What to load: `weights.base` through models.load, then each adapter in order (all but the last merged)."""

    weights: Weights
    stage: str
    run_dir: Path | None = None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="the YAML recipe (a run's resolved recipe works too)")
    parser.add_argument("--model", required=True, help="a run directory, a checkpoint folder or a hub id")
    parser.add_argument(
        "--adapter", type=Path, help="a LoRA adapter folder to apply (replaces the stage's adapter)"
    )
    parser.add_argument(
        "--task",
        action="append",
        choices=sorted(TASKS),
        help="score this task (repeatable); default: the recipe's eval.tasks",
    )
    parser.add_argument("--limit", type=int, help="score at most this many examples per task (eval.limit)")
    parser.add_argument(
        "--stage",
        choices=STAGES,
        help="which stage the model is (default: a run directory's "
        "latest stage; otherwise sft with --adapter, else base)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=PATH",
        help="read TASK from a local file or folder (repeatable)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="where eval/ goes (default: the run directory, else the "
        "recipe's output_dir, else runs/<recipe name>-<time>)",
    )
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


def plan_model(model: str, recipe: Recipe, *, stage: str | None, adapter: Path | None) -> ModelPlan:
    """The weights to score: a run directory's stage (default: its latest), with `adapter` in place of the stage's own;
    or a checkpoint folder / hub id, with `adapter` over it."""
    if adapter is not None and not is_adapter(adapter):
        raise ValueError(f"--adapter {adapter}: no {ADAPTER_CONFIG} there; pass a PEFT adapter folder")
    if stage == "base" and adapter is not None:
        raise ValueError("--stage base with --adapter: the base model has no adapter; drop one of them")
    if not is_run_dir(Path(model)):
        weights = Weights(base=model, revision=recipe.model.revision, adapters=(adapter,) if adapter else ())
        return ModelPlan(weights=verify_weights(weights), stage=stage or ("sft" if adapter else "base"))
    run_dir = Path(model)
    stage = stage or latest_stage(run_dir)
    if adapter is None:
        return ModelPlan(weights=stage_weights(run_dir, stage, recipe), stage=stage, run_dir=run_dir)
    start = base_weights(run_dir, recipe) if stage == "sft" else read_start(run_dir)
    weights = Weights(base=start.base, revision=start.revision, adapters=(*start.adapters, adapter))
    return ModelPlan(weights=verify_weights(weights), stage=stage, run_dir=run_dir)


def load_planned(plan: ModelPlan, recipe: Recipe):
    """(model in eval mode, processor): the weights, then the adapters (all but the last merged, the last kept as a
    PeftModel, as the training-time eval scores it). With `model.quantization` the language model is quantised after
    the merges and before the last adapter, as training loaded it (train/core/model_loading.py)."""
    from models.adapters import apply_adapter
    from models.quantization import apply_quantization

    weights = plan.weights
    model, processor = models.load(
        weights.base,
        revision=weights.revision,
        dtype=recipe.model.dtype,
        attn_implementation=recipe.model.attn_implementation,
        num_crops=recipe.model.num_crops,
    )
    for adapter in weights.adapters[:-1]:
        model = apply_adapter(model, adapter, merge=True)
    model = apply_quantization(model, recipe.model)
    if weights.adapters:
        model = apply_adapter(model, weights.adapters[-1], merge=False)
    return model.eval(), processor


def model_id_for_cache(plan: ModelPlan, recipe: Recipe) -> str:
    """The base's id the way the training-time hook spells it, so that both share base cache entries."""
    from models.quantization import quantization_tag

    weights = plan.weights
    if plan.stage == "base" and not weights.adapters:
        return f"{weights.base}@{recipe.model.revision or 'main'}{quantization_tag(recipe.model)}"
    return "+".join([weights.base, *map(str, weights.adapters)])


# ------------------------------------------------------------------------------------------------ the table


def _accelerator():
    """An Accelerator under `accelerate launch` with several processes (generation is sharded), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe)
    recipe_eval = dataclasses.replace(
        recipe.eval,
        tasks=tuple(args.task or recipe.eval.tasks),
        limit=args.limit if args.limit is not None else recipe.eval.limit,
    )
    if not recipe_eval.tasks:
        raise ValueError(f"{args.recipe}: eval.tasks is empty and no --task is given; nothing to score")
    plan = plan_model(args.model, recipe, stage=args.stage, adapter=args.adapter)
    run_dir = args.output_dir or plan.run_dir or resolve_output_dir(recipe, args.recipe)
    model, processor = load_planned(plan, recipe)
    accelerator = _accelerator()
    model.to(accelerator.device if accelerator else "cuda" if torch.cuda.is_available() else "cpu")
    failure = None
    try:
        evaluate_stage(
            plan.stage,
            model,
            processor,
            recipe_eval,
            run_dir,
            model_id_for_cache=model_id_for_cache(plan, recipe),
            accelerator=accelerator,
            data=recipe.data,
            task_paths=task_paths(args.data),
        )
    except EvalGateError as error:
        failure = error
    if accelerator is None or accelerator.is_main_process:
        print(f"{plan.stage} model: {plan.weights.describe()}")
        print(results_table(run_dir, recipe_eval.tasks))
        print(f"report: {report_file(run_dir)}")
        if failure is not None:
            print(failure, file=sys.stderr)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    run_main("python -m eval", main)
