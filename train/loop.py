"""One compact training loop on accelerate, shared by SFT and DPO; each stage brings its loss.

Loss normalisation (docs/architecture.md#loss-normalisation): a stage's `loss_sum(model, batch)` returns the SUM of its per-unit losses
(units: supervised tokens for SFT, pairs for DPO) and `count(batch)` the number of units. The loop fetches the
`grad_accum` micro-batches of an optimizer step first, all-reduces their unit count across ranks, and back-propagates
`loss_sum / global_units`, so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradients, on any
number of ranks. accelerate divides by `grad_accum` and DDP/DeepSpeed average over ranks: the loss handed to
`accelerator.backward` is multiplied by both to undo that.

Resume continues the exact data order: the sampler is seeded by (seed, epoch), the loop state records the epoch and
how many micro-batches of it were consumed, and `accelerator.skip_first_batches` skips those without loading them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from train.checkpoint import Checkpointer
from train.tracking import batch_tokens

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]
CountFn = Callable[[dict], int]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # consumed in the current epoch
    units_seen: int = 0  # supervised tokens (SFT) or pairs (DPO), all ranks
    samples_seen: int = 0
    history: list[dict] = field(default_factory=list)  # one record per logged step

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> LoopState:
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    total_steps: int
    grad_accum: int
    max_grad_norm: float | None
    log_every: int
    checkpoint_every: int
    unit_name: str = "tokens"


def global_sum(accelerator: Accelerator, value: int | float) -> float:
    tensor = torch.tensor(float(value), device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="sum")) if accelerator.num_processes > 1 else float(value)


def micro_batches(make_loader: Callable[[int], object], state: LoopState, accelerator: Accelerator, grad_accum: int) -> Iterator[list[dict]]:
    """Yield the micro-batches of each optimizer step, epoch after epoch, resuming mid-epoch where the state says.
    A tail of fewer than `grad_accum` micro-batches at the end of an epoch is dropped (a step is always whole)."""
    while True:
        loader = make_loader(state.epoch)
        if state.micro_batches_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.micro_batches_in_epoch)
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        state.epoch += 1
        state.micro_batches_in_epoch = 0


def run_loop(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    make_loader: Callable[[int], object],
    loss_sum: LossFn,
    count: CountFn,
    config: LoopConfig,
    state: LoopState,
    checkpointer: Checkpointer | None = None,
    on_step: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Train until `config.total_steps`; returns the final state. `make_loader(epoch)` builds the (prepared)
    DataLoader of an epoch with its sampler seeded for that epoch."""
    model.train()
    progress = tqdm(total=config.total_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    counted = ("units", "samples", "tokens", "supervised_tokens")
    window = {"start": time.perf_counter(), "steps": 0, **dict.fromkeys(counted, 0.0)}
    steps = micro_batches(make_loader, state, accelerator, config.grad_accum)
    while state.step < config.total_steps:
        group = next(steps)
        record = train_step(accelerator, model, optimizer, scheduler, group, loss_sum, count, config)
        state.step += 1
        state.micro_batches_in_epoch += len(group)
        state.units_seen += int(record["units"])
        state.samples_seen += int(record["samples"])
        for key in counted:
            window[key] += record[key]
        window["steps"] += 1
        progress.update(1)
        if state.step % config.log_every == 0 or state.step == config.total_steps:
            record.update(throughput(window, state, config))
            state.history.append({"step": state.step, **record})
            accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            window.update(start=time.perf_counter(), steps=0, **dict.fromkeys(counted, 0.0))
        if checkpointer and (state.step % config.checkpoint_every == 0 or state.step == config.total_steps):
            checkpointer.save(state)
        if on_step:
            on_step(state)
    progress.close()
    return state


def train_step(accelerator, model, optimizer, scheduler, group, loss_sum, count, config) -> dict:
    """One optimizer step over the micro-batches `group`; returns the step's metrics."""
    local_units = sum(count(b) for b in group)
    local_tokens, local_supervised = (sum(n) for n in zip(*(batch_tokens(b) for b in group)))
    global_units = global_sum(accelerator, local_units)
    if global_units == 0:
        raise RuntimeError("an optimizer step has no supervised unit on any rank: check the data's labels")
    scale = accelerator.num_processes * config.grad_accum / global_units
    loss_total = 0.0
    grad_norm = None
    metrics: dict[str, float] = {}
    for batch in group:
        with accelerator.accumulate(model):
            loss, extra = loss_sum(model, batch)
            accelerator.backward(loss * scale)
            loss_total += float(loss.detach())
            for key, value in extra.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
            if accelerator.sync_gradients:
                # inf: measure the norm without clipping.
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            optimizer.step()  # accelerate's optimizer wrapper skips the step and zero_grad between boundaries
            if accelerator.sync_gradients:
                # The scheduler is not given to accelerate.prepare, which would step it once per process.
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    samples = global_sum(accelerator, sum(int(b["input_ids"].shape[0]) for b in group))
    record = {
        "loss": global_sum(accelerator, loss_total) / global_units,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "units": global_units,
        "samples": samples,
        "tokens": global_sum(accelerator, local_tokens),  # every token computed, padding excluded
        "supervised_tokens": global_sum(accelerator, local_supervised),
    }
    record.update({k: global_sum(accelerator, v) / global_units for k, v in metrics.items()})
    return record


def throughput(window: dict, state: LoopState, config: LoopConfig) -> dict:
    seconds = max(time.perf_counter() - window["start"], 1e-9)
    per_step = seconds / max(window["steps"], 1)
    return {
        "tokens_per_s": window["tokens"] / seconds,  # all tokens (train/tracking.py batch_tokens)
        "supervised_tokens_per_s": window["supervised_tokens"] / seconds,
        **({f"{config.unit_name}_per_s": window["units"] / seconds} if config.unit_name != "tokens" else {}),
        "samples_per_s": window["samples"] / seconds,
        "eta_s": per_step * (config.total_steps - state.step),
        "epoch": state.epoch,
    }


def total_steps_for(num_micro_batches_per_epoch: int, grad_accum: int, max_steps: int | None, epochs: float | None) -> int:
    """Optimizer steps from max_steps, or from epochs over `num_micro_batches_per_epoch` micro-batches per rank."""
    if max_steps is not None:
        return max_steps
    steps_per_epoch = num_micro_batches_per_epoch // grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has {num_micro_batches_per_epoch} micro-batches per rank, fewer than train.grad_accum="
            f"{grad_accum}: lower grad_accum or micro_batch_size, or add data"
        )
    return max(1, math.floor(steps_per_epoch * (epochs or 1.0)))
