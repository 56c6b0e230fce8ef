"""Supervised fine-tuning of Phi-3-Vision (LoRA or full) from a YAML recipe.

    accelerate launch train/sft.py recipes/chartqa.yaml [key=value ...]
    python train/sft.py recipes/demo.yaml                  # one process, e.g. the CPU demo
    python train/sft.py --help                             # every recipe key with its documentation

Reads top to bottom: recipe, run directory, data, model and LoRA, preflight, loop, save, eval hook.
The loss is summed over supervised tokens and divided by the supervised tokens of the whole optimizer step, across
micro-batches and ranks (train/loop.py).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch train/sft.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from data.sources import SkipCounter
from train import common, stage
from train.data import stage_loaders
from train.eval_hook import run_eval_hook
from train.loop import total_steps_for
from train.parts import configure_trainable
from train.recipe_schema import Recipe

log = logging.getLogger("train.sft")


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over supervised tokens. Only positions that predict a supervised token get logits
    (`logits_to_keep`): with a 2,500-token image, that skips the vocabulary projection of ~99% of the sequence."""
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)  # positions t whose next token is supervised somewhere
    logits = model(**common.model_inputs(batch), logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=-100, reduction="sum")
    return loss, {}


def supervised_tokens(batch: dict) -> int:
    return int(batch["num_supervised_tokens"])


def preflight(accelerator, model, first_batch: dict, recipe: Recipe) -> None:
    """Before step 1: report what trains and the first batch's supervised tokens; one forward and backward must
    reach every part the recipe trains."""
    log.info(common.report_trainable(model))
    log.info("first batch: %d sequences, %d supervised tokens", first_batch["input_ids"].shape[0],
             supervised_tokens(first_batch))
    with common.autocast_context(accelerator):
        loss, _ = sft_loss_sum(model, first_batch)
    loss.backward()
    common.check_gradients(model, common.trained_parts(recipe.model))
    model.zero_grad(set_to_none=True)


def first_batch_with_images(make_loader, limit: int = 32) -> dict:
    """The first batch of epoch 0 that holds an image (the vision parts get no gradient from text-only batches)."""
    first = None
    for i, batch in enumerate(make_loader(0)):
        first = first or batch
        if "pixel_values" in batch or i >= limit:
            return batch
    return first


def main(recipe: Recipe, recipe_path: str | Path | None = None, *, stop_after_step: int | None = None) -> Path:
    """Run SFT; returns the run directory. `stop_after_step` ends the run after that step's checkpoint, as a
    preemption would (resume then continues it)."""
    started = time.perf_counter()
    run_dir, accelerator, stage_dir = stage.open_stage(recipe, recipe_path, "sft")
    device = accelerator.device

    # Model first: the demo's tiny model builds its tokenizer from the data's texts; the data needs the processor.
    model, processor, base_path = common.load_model(recipe.model, run_dir, seed=recipe.seed, accelerator=accelerator)

    skips = SkipCounter()
    planned, make_loader, batches_per_epoch = stage_loaders(recipe, processor, "sft", accelerator, skips)
    total_steps = total_steps_for(batches_per_epoch, recipe.train.grad_accum, recipe.train.max_steps, recipe.train.epochs)
    log.info("%d samples planned, %d micro-batches per rank per epoch, %d optimizer steps", len(planned),
             batches_per_epoch, total_steps)

    model.to(device)
    run_eval_hook("base", model, processor, recipe, run_dir, base_path=base_path, accelerator=accelerator)

    model = configure_trainable(model, recipe.model, recipe.lora, seed=recipe.seed)
    common.upcast_trainable_(model)
    preflight(accelerator, model, common.to_device(first_batch_with_images(make_loader), device), recipe)

    model, state = stage.fit(accelerator, recipe, model, make_loader=make_loader, loss_sum=sft_loss_sum,
                             count=supervised_tokens, total_steps=total_steps, stage_dir=stage_dir, run_dir=run_dir,
                             unit_name="tokens", stop_after_step=stop_after_step, processor=processor, stage="sft")

    trained = common.save_trained(accelerator, model, processor,
                                  stage_dir / ("adapter" if common.is_peft(accelerator.unwrap_model(model)) else "merged"))
    stage.write_summary(stage_dir, state, skips, started, accelerator, trained)
    run_eval_hook("sft", accelerator.unwrap_model(model), processor, recipe, run_dir, base_path=base_path,
                  accelerator=accelerator)
    if skips.total:
        log.warning("rows left out of this run:\n%s", skips.summary())
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"run directory: {run_dir}")
    return run_dir


def cli(argv: list[str] | None = None) -> Path:
    return stage.cli(main, __doc__, argv)


if __name__ == "__main__":
    cli()
