"""What SFT and DPO run once their model, adapters and data are ready: optimizer and schedule, accelerate's
prepare, checkpoints and resume, trackers, the loop with its callbacks and stop signals, and the stage's summary.

Resume is checked twice (train/core/checkpoint.py): the recipe's run-shaping values when the stage opens, before anything
is loaded or written; the data, the frozen weights and the trainable parameters once they are known. The run
directory's resolved recipe (rundir.stage_dir.record_run) is rewritten on resume only after both accepted it."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from config import Recipe
from eval.summary import run_summary
from rundir import run_lock
from rundir.atomic import write_json_atomically
from rundir.layout import checkpoints_dir, diagnostics_file, rank_log_file, resolve_output_dir, summary_file
from rundir.stage_dir import prepare_stage_dir, record_run
from runtime import diagnostics
from train.core import device, optim, tracking
from train.core.checkpoint import (
    Checkpointer,
    check_resume,
    checkpoints,
    frozen_fingerprint,
    nonfinite_parameters,
    shaping_values,
    trainable_shapes,
)
from train.core.loop import Diverged, LoopConfig, LoopState, StopSignals, global_sum, run_loop
from train.core.trainable import parameter_groups

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
    data_fingerprint: str = ""  # train.core.checkpoint.data_fingerprint of the planned samples


def open_stage(recipe: Recipe, recipe_path, stage: str):
    """(run_dir, accelerator, stage_dir) for a stage: the run directory resolved, accelerate set up, `<run>/<stage>`
    created (never over an earlier run of it unless the recipe says so) and the stage's trackers started (before
    the base eval, which they log at step 0). The run directory's lock is taken first (one writer at a time). A resume that changes a run-shaping value is refused here, before
    anything is loaded or written."""
    log.info("intra-op threads: %d", device.set_threads(recipe))  # before the model loads
    run_dir = resolve_output_dir(recipe, recipe_path)
    accelerator = device.make_accelerator(
        recipe, run_dir, recipe.train.grad_accum, log_with=tracking.make_trackers(recipe, run_dir, stage)
    )
    take_run_lock(accelerator, run_dir)
    if recipe.train.resume:
        check_resume(recipe, stage, checkpoints_dir(run_dir, stage), accelerator.num_processes, accelerator)
    folder = prepare_stage_dir(run_dir, recipe, stage=stage, is_main=accelerator.is_main_process)
    rank = accelerator.process_index
    diagnostics.start(
        functools.partial(diagnostics_file, run_dir),
        rank_log_file(run_dir, rank),
        rank,
        accelerator.num_processes,
        recipe.train.collective_timeout_s,
    )
    tracking.start(accelerator, recipe, run_dir, stage)
    return run_dir, accelerator, folder


def resumes(recipe: Recipe, run_dir: Path, stage: str) -> bool:
    """Whether the stage continues a checkpoint (after open_stage set failed ones aside): its start, the base eval
    included, was logged by the run it continues."""
    return recipe.train.resume and bool(checkpoints(checkpoints_dir(run_dir, stage)))


def take_run_lock(accelerator, run_dir: Path) -> None:
    """The main process takes (or joins) the run directory's lock (rundir/run_lock.py); every rank gets its refusal,
    so that no rank waits for a main process that left."""
    refusal: list = [None]
    if accelerator.is_main_process:
        try:
            run_lock.acquire(run_dir, command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        except run_lock.RunLocked as error:
            refusal[0] = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        raise run_lock.RunLocked(refusal[0])


def fit(
    accelerator,
    recipe: Recipe,
    model,
    plan: StagePlan,
    *,
    make_loader: Callable,
    loss_sum: Callable,
    count: Callable,
    callbacks: Sequence[Callback] = (),
):
    """Train `model` (adapters and trained parts already set) for `plan.total_steps`; returns (prepared model,
    final loop state). Each callback runs after every optimizer step (and its checkpoint). Raises `Diverged` rather
    than return non-finite trainable parameters, and `Interrupted` after a SIGINT/SIGTERM (train/core/loop.py)."""
    values = {**shaping_values(recipe, plan.stage, accelerator.num_processes), "data": plan.data_fingerprint}
    record = {
        "values": values,
        "frozen_fingerprint": frozen_fingerprint(model),
        "trainable": trainable_shapes(model),
    }
    optimizer = optim.make_optimizer(
        parameter_groups(model, recipe.train), recipe.train, lr_scale=plan.lr_scale
    )
    scheduler = optim.make_scheduler(optimizer, recipe.train, plan.total_steps)
    model, optimizer = device.prepare(accelerator, model, optimizer, recipe.train.micro_batch_size)
    checkpointer = Checkpointer(
        accelerator,
        checkpoints_dir(plan.run_dir, plan.stage),
        keep=recipe.train.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        record=record,
        allowed=recipe.train.resume_allow_changes,
    )
    state = checkpointer.restore(LoopState) if recipe.train.resume else None
    if (
        recipe.train.resume and state is None
    ):  # launch.sh --max-restarts asks to resume from the first start on
        log.warning(
            "train.resume: no complete checkpoint in %s yet; starting from step 0", checkpointer.directory
        )
    state = state or LoopState()
    if recipe.train.resume and accelerator.is_main_process:  # accepted: now the run uses this recipe
        record_run(plan.run_dir, recipe)

    def loss_on_device(model_, batch):
        with device.autocast_context(accelerator):
            return loss_sum(model_, device.to_device(batch, accelerator.device))

    config = LoopConfig(
        total_steps=plan.total_steps,
        grad_accum=recipe.train.grad_accum,
        max_grad_norm=recipe.train.max_grad_norm,
        log_every=recipe.train.log_every,
        checkpoint_every=recipe.train.checkpoint_every,
        unit_name=plan.unit_name,
        on_nonfinite=recipe.train.on_nonfinite,
        max_nonfinite_steps=recipe.train.max_nonfinite_steps,
        resume_command=f"train.resume=true output_dir={plan.run_dir}",
        ranks_per_sample=recipe.train.sequence_parallel,
    )

    def on_step(state_: LoopState) -> None:
        for callback in callbacks:
            callback(state_, model)

    with StopSignals() as signals:
        state = run_loop(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            make_loader=make_loader,
            loss_sum=loss_on_device,
            count=count,
            config=config,
            state=state,
            checkpointer=checkpointer,
            on_step=on_step,
            signals=signals,
            step_guard=diagnostics.step_guard,
        )
    bad = nonfinite_parameters(accelerator.unwrap_model(model))
    if global_sum(accelerator, len(bad)) > 0:  # the stage saves what fit returns: never a non-finite adapter
        raise Diverged(state.step, f"trainable parameters are not finite ({', '.join(bad[:3])})")
    return model, state


def finish(accelerator, run_dir: Path) -> Path:
    """End the stage: close the trackers, print the scores so far, the skipped rows and the run directory, and
    release the run directory's lock."""
    accelerator.end_training()
    if accelerator.is_main_process:
        print(run_summary(run_dir))
        print(f"run directory: {run_dir}")
        run_lock.release(run_dir)
    return run_dir


def write_summary(
    run_dir: Path, stage: str, state: LoopState, skips, started: float, accelerator, trained: Path, **extra
) -> None:
    """summary.json; `extra` adds keys (SFT: `validation`, the validation loss at each evaluation)."""
    if not accelerator.is_main_process:
        return
    write_json_atomically(
        summary_file(run_dir, stage),
        {
            "steps": state.step,
            "epochs_started": state.epoch + (1 if state.micro_batches_in_epoch else 0),
            "units_seen": state.units_seen,
            "samples": state.samples_seen,
            "seconds": round(time.perf_counter() - started, 1),
            "saved": str(trained),
            "skipped_rows": skips.counts(),
            "history": state.history,
            **extra,
        },
    )
