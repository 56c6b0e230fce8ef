"""What SFT and DPO run once their model, adapters and data are ready: optimizer and schedule, accelerate's
prepare, checkpoints and resume, trackers, the loop, and the summary; and their shared command line."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import common
from .checkpoint import Checkpointer
from .eval_hook import every_steps_callback
from .loop import LoopConfig, LoopState, run_loop
from .parts import parameter_groups
from .recipe import load_recipe, recipe_help, recipe_to_dict, redact_secrets, resolve_output_dir
from .recipe_schema import Recipe
from .run_dir import prepare_run_dir


def open_stage(recipe: Recipe, recipe_path, stage: str):
    """(run_dir, accelerator, stage_dir) for a stage: the run directory resolved, accelerate set up, and
    `<run>/<stage>` created (never over an earlier run of it unless the recipe says so)."""
    run_dir = resolve_output_dir(recipe, recipe_path)
    accelerator = common.make_accelerator(recipe, run_dir, recipe.train.grad_accum)
    return run_dir, accelerator, prepare_run_dir(run_dir, recipe, stage=stage, is_main=accelerator.is_main_process)


def fit(accelerator, recipe: Recipe, model, *, make_loader: Callable, loss_sum: Callable, count: Callable,
        total_steps: int, stage_dir: Path, run_dir: Path, unit_name: str, lr_scale: float = 1.0,
        stop_after_step: int | None = None, processor=None, stage: str = "sft"):
    """Train `model` (adapters and trained parts already set) for `total_steps`; returns (prepared model, state).
    With `eval.every_steps`, the model is also scored during training (train/eval_hook.py)."""
    device = accelerator.device
    optimizer = common.make_optimizer(parameter_groups(model, recipe.train), recipe.train, lr_scale=lr_scale)
    scheduler = common.make_scheduler(optimizer, recipe.train, total_steps)
    model, optimizer = common.prepare(accelerator, model, optimizer, recipe.train.micro_batch_size)
    accelerator.register_for_checkpointing(scheduler)
    checkpointer = Checkpointer(accelerator, stage_dir / "checkpoints", keep=recipe.train.keep_checkpoints)
    state = (checkpointer.restore(LoopState) if recipe.train.resume else None) or LoopState()
    accelerator.init_trackers(recipe.logging.project or "phi3v-tune", config=flat_config(recipe),
                              init_kwargs=tracker_names(recipe, run_dir))

    def loss_on_device(model_, batch):
        with common.autocast_context(accelerator):
            return loss_sum(model_, common.to_device(batch, device))

    config = LoopConfig(total_steps=total_steps, grad_accum=recipe.train.grad_accum,
                        max_grad_norm=recipe.train.max_grad_norm, log_every=recipe.train.log_every,
                        checkpoint_every=recipe.train.checkpoint_every, unit_name=unit_name)
    callbacks = [c for c in (every_steps_callback(stage, model, processor, recipe, run_dir, accelerator=accelerator),
                             common.stopper(stop_after_step)) if c is not None]

    def on_step(state_) -> None:
        for callback in callbacks:
            callback(state_)

    state = run_loop(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                     make_loader=make_loader, loss_sum=loss_on_device, count=count, config=config, state=state,
                     checkpointer=checkpointer, on_step=on_step)
    return model, state


def write_summary(stage_dir: Path, state: LoopState, skips, started: float, accelerator, trained: Path) -> None:
    if not accelerator.is_main_process:
        return
    summary = {
        "steps": state.step,
        "epochs_started": state.epoch + (1 if state.micro_batches_in_epoch else 0),
        "units_seen": state.units_seen,
        "samples": state.samples_seen,
        "seconds": round(time.perf_counter() - started, 1),
        "saved": str(trained),
        "skipped_rows": skips.counts(),
        "history": state.history,
    }
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


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


def tracker_names(recipe: Recipe, run_dir: Path) -> dict:
    name = recipe.logging.run_name or run_dir.name
    return {"wandb": {"name": name}} if "wandb" in recipe.logging.report_to else {}


def cli(main: Callable, doc: str, argv: list[str] | None = None):
    """`<stage>.py RECIPE [key=value ...]` or `--help` (the module doc and every recipe key)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        print(recipe_help())
        raise SystemExit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(load_recipe(argv[0], argv[1:]), argv[0])
