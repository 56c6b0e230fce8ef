"""SFT's validation loss: the summed token cross-entropy over the supervised tokens of the recipe's `data.eval`
SFT-format sources (the demo's synthetic eval split), divided by their count, every `eval.every_steps` steps and at
the stage's last step. Logged to the trackers as `val/loss` (and `val/tokens`) at its step, appended to
`<run>/sft/validation.jsonl` (so that a resumed stage keeps the values from before its checkpoint) and written to the
stage's summary (`validation`). The same per-token normalisation as the training loss (train/core/loop.py), over every
sample once, across ranks."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from config import Recipe
from data.loaders import eval_loss_loader, load_samples, plan, stage_sources
from data.sources import SkipCounter
from rundir.layout import validation_file
from runtime.processes import shards_parameters
from train.core.device import autocast_context, to_device
from train.core.loop import global_sum
from train.core.losses import sft_loss_sum, supervised_tokens

log = logging.getLogger(__name__)


def filler_batches(samples: int, batch_size: int, num_replicas: int, rank: int) -> int:
    """How many batches `rank` has fewer than the rank with the most, under `data.loaders.eval_loss_loader`'s split
    (batch i to rank i mod num_replicas)."""
    batches = -(-samples // batch_size)
    return -(-batches // num_replicas) - len(range(rank, batches, num_replicas))


class ValidationLoss:
    """A trainer callback (`callback(state, prepared_model)`); build it with `for_recipe`."""

    def __init__(
        self, recipe: Recipe, processor, run_dir: Path, accelerator, *, total_steps: int, stage: str = "sft"
    ):
        self.accelerator, self.total_steps, self.every = accelerator, total_steps, recipe.eval.every_steps
        self.file = validation_file(run_dir, stage)
        skips = SkipCounter()
        samples = load_samples(
            recipe.data.eval,
            "sft",
            recipe.data,
            seed=recipe.seed,
            skips=skips,
            main_first=accelerator.main_process_first,
        )
        self.planned = plan(
            samples, processor, replace(recipe.data, on_bad_sample="skip", on_overlong="drop"), skips
        )
        batch_size = recipe.train.micro_batch_size
        self.loader = eval_loss_loader(
            self.planned,
            processor,
            recipe.data,
            batch_size=batch_size,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )
        # Sharded parameters (ZeRO-3, FSDP) gather in every forward, a collective call: every rank must run as many
        # forwards as the rank with the most batches. The others run the first batch again and drop its loss.
        self.fillers = 0
        if shards_parameters(accelerator) and self.planned:
            self.fillers = filler_batches(
                len(self.planned), batch_size, accelerator.num_processes, accelerator.process_index
            )
        self.filler = (
            eval_loss_loader(self.planned[:batch_size], processor, recipe.data, batch_size=batch_size)
            if self.fillers
            else None
        )
        if accelerator.is_main_process and not recipe.train.resume:
            self.file.unlink(missing_ok=True)  # a fresh stage (or an overwritten one) starts a fresh record
        log.info(
            "validation loss on %d held-out samples, %s",
            len(self.planned),
            f"every {self.every} steps and at the end" if self.every else "at the end",
        )

    @classmethod
    def for_recipe(cls, recipe: Recipe, processor, run_dir: Path, accelerator, *, total_steps: int):
        """The callback, or None when `data.eval` holds no SFT-format source."""
        if not stage_sources(recipe.data.eval, "sft"):
            return None
        return cls(recipe, processor, run_dir, accelerator, total_steps=total_steps)

    def __call__(self, state, model) -> None:
        if state.step == self.total_steps or (self.every and state.step % self.every == 0):
            self.evaluate(model, state.step)

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict:
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(model)  # no DDP forward: ranks may run different batch counts
        was_training = unwrapped.training
        unwrapped.eval()
        loss_sum, tokens = 0.0, 0
        try:
            for batch in self.loader:
                batch = to_device(batch, accelerator.device)
                with autocast_context(accelerator):
                    loss, _ = sft_loss_sum(unwrapped, batch)
                loss_sum += float(loss)
                tokens += supervised_tokens(batch)
            for _ in range(self.fillers):  # forwards only, their loss dropped (see __init__)
                for batch in self.filler:
                    with autocast_context(accelerator):
                        sft_loss_sum(unwrapped, to_device(batch, accelerator.device))
        finally:
            unwrapped.train(was_training)
        loss_sum, tokens = global_sum(accelerator, loss_sum), int(global_sum(accelerator, tokens))
        record = {
            "step": step,
            "loss": loss_sum / tokens if tokens else float("nan"),
            "tokens": tokens,
            "samples": len(self.planned),
        }
        accelerator.log({"val/loss": record["loss"], "val/tokens": tokens}, step=step)
        if accelerator.is_main_process:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self.file.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        log.info("validation loss at step %d: %.4f over %d supervised tokens", step, record["loss"], tokens)
        return record

    def records(self) -> list[dict]:
        """Every evaluation of this stage, one per step (a step evaluated again after a resume: its last value)."""
        if not self.file.is_file():
            return []
        by_step = {}
        for line in self.file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
        return [by_step[step] for step in sorted(by_step)]
