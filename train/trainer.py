"""What SFT and DPO run once their model, adapters and data are ready: optimizer and schedule, accelerate's
prepare, checkpoints and resume, trackers, the loop with its callbacks, and the stage's summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recipe import Recipe, recipe_to_dict
from recipe.parse import redact_secrets
from recipe.run_dir import (
    checkpoints_dir,
    prepare_stage_dir,
    resolve_output_dir,
    summary_file,
    write_json_atomically,
)
from train import device, optim
from train.checkpoint import Checkpointer
from train.loop import LoopConfig, LoopState, run_loop
from train.trainable import parameter_groups

log = logging.getLogger(__name__)

Callback = Callable[[LoopState, object], None]  # (state after the step, the prepared model)


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What a stage asks of the trainer besides the recipe: which stage, where, how long, and its unit."""

    stage: str  # "sft" or "dpo"
    run_dir: Path
    total_steps: int
    unit_name: str  # what the loss is averaged over: "tokens" (SFT) or "pairs" (DPO)
    lr_scale: float = 1.0  # the stage's peak LR over train.lr (DPO's dpo.lr)


def open_stage(recipe: Recipe, recipe_path, stage: str):
    """(run_dir, accelerator, stage_dir) for a stage: the run directory resolved, accelerate set up, and
    `<run>/<stage>` created (never over an earlier run of it unless the recipe says so)."""
    log.info("intra-op threads: %d", device.set_threads(recipe))  # before the model loads
    run_dir = resolve_output_dir(recipe, recipe_path)
    accelerator = device.make_accelerator(recipe, run_dir, recipe.train.grad_accum)
    return run_dir, accelerator, prepare_stage_dir(run_dir, recipe, stage=stage, is_main=accelerator.is_main_process)


def fit(accelerator, recipe: Recipe, model, plan: StagePlan, *, make_loader: Callable, loss_sum: Callable,
        count: Callable, callbacks: Sequence[Callback] = ()):
    """Train `model` (adapters and trained parts already set) for `plan.total_steps`; returns (prepared model,
    final loop state). Each callback runs after every optimizer step (and its checkpoint)."""
    optimizer = optim.make_optimizer(parameter_groups(model, recipe.train), recipe.train, lr_scale=plan.lr_scale)
    scheduler = optim.make_scheduler(optimizer, recipe.train, plan.total_steps)
    model, optimizer = device.prepare(accelerator, model, optimizer, recipe.train.micro_batch_size)
    accelerator.register_for_checkpointing(scheduler)
    checkpointer = Checkpointer(accelerator, checkpoints_dir(plan.run_dir, plan.stage), keep=recipe.train.keep_checkpoints)
    state = (checkpointer.restore(LoopState) if recipe.train.resume else None) or LoopState()
    accelerator.init_trackers(recipe.logging.project or "phi3v-tune", config=flat_config(recipe),
                              init_kwargs=tracker_names(recipe, plan.run_dir))

    def loss_on_device(model_, batch):
        with device.autocast_context(accelerator):
            return loss_sum(model_, device.to_device(batch, accelerator.device))

    config = LoopConfig(total_steps=plan.total_steps, grad_accum=recipe.train.grad_accum,
                        max_grad_norm=recipe.train.max_grad_norm, log_every=recipe.train.log_every,
                        checkpoint_every=recipe.train.checkpoint_every, unit_name=plan.unit_name)

    def on_step(state_: LoopState) -> None:
        for callback in callbacks:
            callback(state_, model)

    state = run_loop(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                     make_loader=make_loader, loss_sum=loss_on_device, count=count, config=config, state=state,
                     checkpointer=checkpointer, on_step=on_step)
    return model, state


def write_summary(run_dir: Path, stage: str, state: LoopState, skips, started: float, accelerator, trained: Path) -> None:
    if not accelerator.is_main_process:
        return
    write_json_atomically(summary_file(run_dir, stage), {
        "steps": state.step,
        "epochs_started": state.epoch + (1 if state.micro_batches_in_epoch else 0),
        "units_seen": state.units_seen,
        "samples": state.samples_seen,
        "seconds": round(time.perf_counter() - started, 1),
        "saved": str(trained),
        "skipped_rows": skips.counts(),
        "history": state.history,
    })


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
