"""Supervised fine-tuning of Phi-3-Vision (LoRA or full) from a YAML recipe.

    accelerate launch train/sft.py recipes/chartqa.yaml [key=value ...]
    python train/sft.py recipes/demo.yaml                  # one process, e.g. the CPU demo
    python train/sft.py --help                             # every recipe key with its documentation

Reads top to bottom: recipe, run directory, model, data, base eval, trainable parts, preflight, loop, save, eval.
The loss is summed over supervised tokens and divided by the supervised tokens of the whole optimizer step, across
micro-batches and ranks (train/core/loop.py).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/sft.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Recipe
from data.loaders import stage_loaders
from data.sources import SkipCounter
from rundir.layout import adapter_dir, cache_dir, merged_dir
from rundir.stage_dir import mark_training_started
from train.core import callbacks, device, sequence_groups, trainer
from train.core.checkpoint import data_fingerprint
from train.core.cli import run_cli
from train.core.loop import total_steps_for
from train.core.losses import sft_loss_sum, supervised_tokens
from train.core.model_loading import is_peft, load_model, save_trained
from train.core.trainable import (
    LANGUAGE,
    check_gradients,
    configure_trainable,
    report_trainable,
    trained_parts,
    upcast_trainable_,
)
from train.core.validation_loss import ValidationLoss

log = logging.getLogger("train.sft")


def preflight(accelerator, model, first_batch: dict, recipe: Recipe, sp=None) -> None:
    """Before step 1: report what trains and the first batch's supervised tokens; one forward and backward must
    reach every part the recipe trains."""
    log.info(report_trainable(model))
    log.info(
        "first batch: %d sequences, %d supervised tokens",
        first_batch["input_ids"].shape[0],
        supervised_tokens(first_batch),
    )
    with device.autocast_context(accelerator):
        loss, _ = sft_loss_sum(model, first_batch, sp)
    loss.backward()
    expected = trained_parts(recipe.model)
    if (
        "pixel_values" not in first_batch
    ):  # this rank's first batches are text-only: its tower gets no gradient
        log.warning(
            "preflight: no image in this rank's first batches; only the language model's gradient is checked"
        )
        expected &= {LANGUAGE}
    check_gradients(model, expected)
    model.zero_grad(set_to_none=True)


def first_batch_with_images(make_loader, limit: int = 32) -> dict:
    """The first batch of epoch 0 that holds an image (the vision parts get no gradient from text-only batches)."""
    first = None
    for i, batch in enumerate(make_loader(0)):
        first = first or batch
        if "pixel_values" in batch or i >= limit:
            return batch
    return first


def main(
    recipe: Recipe, recipe_path: str | Path | None = None, *, stop_after_step: int | None = None
) -> Path:
    """Run SFT; returns the run directory. `stop_after_step` ends the run after that step's checkpoint, as a
    preemption would (resume then continues it)."""
    started = time.perf_counter()
    run_dir, accelerator, _ = trainer.open_stage(recipe, recipe_path, "sft")

    # Model first: the demo's tiny model builds its tokenizer from the data's texts; the data needs the processor.
    model, processor, base_path = load_model(recipe.model, run_dir, seed=recipe.seed, accelerator=accelerator)

    sp, split = sequence_groups.layout(accelerator, recipe.train.sequence_parallel)
    skips = SkipCounter()
    planned, make_loader, batches_per_epoch = stage_loaders(
        recipe,
        processor,
        "sft",
        skips,
        num_replicas=split.replicas,
        rank=split.rank,
        main_first=accelerator.main_process_first,
        cache_dir=cache_dir(run_dir),
    )
    total_steps = total_steps_for(
        batches_per_epoch, recipe.train.grad_accum, recipe.train.max_steps, recipe.train.epochs
    )
    log.info(
        "%d samples planned, %d micro-batches per rank per epoch, %d optimizer steps",
        len(planned),
        batches_per_epoch,
        total_steps,
    )

    model.to(accelerator.device)
    if not trainer.resumes(
        recipe, run_dir, "sft"
    ):  # a resumed stage scored and logged the base when it started
        callbacks.run_eval_hook(
            "base", model, processor, recipe, run_dir, base_path=base_path, accelerator=accelerator, step=0
        )

    model = configure_trainable(model, recipe.model, recipe.lora, seed=recipe.seed)
    upcast_trainable_(model)
    sequence_groups.attach(model, sp)
    preflight(
        accelerator,
        model,
        device.to_device(first_batch_with_images(make_loader), accelerator.device),
        recipe,
        sp,
    )

    plan = trainer.StagePlan(
        stage="sft",
        run_dir=run_dir,
        total_steps=total_steps,
        unit_name="tokens",
        data_fingerprint=data_fingerprint(planned),
    )
    every = callbacks.eval_every_steps(
        "sft", processor, recipe, run_dir, accelerator=accelerator, total_steps=total_steps
    )
    validation = ValidationLoss.for_recipe(recipe, processor, run_dir, accelerator, total_steps=total_steps)
    stop = callbacks.stop_after(stop_after_step)
    mark_training_started(run_dir, "sft")  # a failure from here on keeps the stage folder
    model, state = trainer.fit(
        accelerator,
        recipe,
        model,
        plan,
        make_loader=make_loader,
        loss_sum=functools.partial(sft_loss_sum, sp=sp),
        count=functools.partial(supervised_tokens, sp=sp),
        callbacks=[c for c in (every, validation, stop) if c is not None],
    )

    lora = is_peft(accelerator.unwrap_model(model))
    trained = save_trained(
        accelerator,
        model,
        processor,
        (adapter_dir if lora else merged_dir)(run_dir, "sft"),
        recipe=recipe,
        run_dir=run_dir,
    )
    trainer.write_summary(
        run_dir,
        "sft",
        state,
        skips,
        started,
        accelerator,
        trained,
        **({"validation": validation.records()} if validation else {}),
    )
    callbacks.run_eval_hook(
        "sft",
        accelerator.unwrap_model(model),
        processor,
        recipe,
        run_dir,
        base_path=base_path,
        accelerator=accelerator,
        step=state.step,
    )
    if skips.total:
        log.warning("rows left out of this run:\n%s", skips.summary())
    return trainer.finish(accelerator, run_dir)


def cli(argv: list[str] | None = None) -> None:
    """The command line: exits 0, or 2 with the message alone on a user error (`--debug` for the traceback)."""
    run_cli(main, __doc__, argv, prog="train/sft.py")


if __name__ == "__main__":
    cli()
