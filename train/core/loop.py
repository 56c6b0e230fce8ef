"""One compact training loop on accelerate, shared by SFT and DPO; each stage brings its loss.

Loss normalisation (docs/architecture.md#loss-normalisation): a stage's `loss_sum(model, batch)` returns the SUM of its per-unit losses
(units: supervised tokens for SFT, pairs for DPO) and `count(batch)` the number of units. The loop fetches the
`grad_accum` micro-batches of an optimizer step first, all-reduces their unit count across ranks, and back-propagates
`loss_sum / global_units`, so batch 8 x accumulation 1 and batch 1 x accumulation 8 give the same gradients, on any
number of ranks. accelerate divides by `grad_accum` and DDP/DeepSpeed average over ranks: the loss handed to
`accelerator.backward` is multiplied by both to undo that.

Resume continues the exact data order: the sampler is seeded by (seed, epoch), the loop state records the epoch and
how many micro-batches of it were consumed, and `accelerator.skip_first_batches` skips those without loading them.

The loop never lies about how a run went:
- a non-finite gradient norm (or loss) stops the run before the optimizer applies it (`train.on_nonfinite: stop`,
  the default; `skip` drops the update and stops after `train.max_nonfinite_steps` such steps), raising `Diverged`
  with the step and a hint; no checkpoint of non-finite parameters is written, the last good one stays the newest.
  The gradient norm is computed on the gradients all ranks share, so every rank decides alike. Under DeepSpeed the
  engine applies the update inside `backward`, so a non-finite step always stops there.
- SIGINT / SIGTERM (`StopSignals`) ask for a stop at the next step boundary: every rank's flag rides along with the
  step's unit count in the one all-reduce each step already does, so all ranks stop at the same step, write the
  checkpoint and raise `Interrupted` (exit code 128 + signal), whose message says how to resume. A second SIGINT stops
  at once; a SIGTERM while stopping (what a launcher sends its workers after a Ctrl-C) is ignored.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from rundir.layout import checkpoint_name
from train.core.checkpoint import Checkpointer, latest_checkpoint, nonfinite_parameters
from train.core.tracking import batch_tokens

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
    nonfinite_steps: int = (
        0  # steps skipped for a non-finite gradient norm or loss (train.on_nonfinite: skip)
    )
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
    on_nonfinite: str = "stop"  # or "skip"
    max_nonfinite_steps: int = 10
    resume_command: str = ""  # the overrides that resume this run, for the stop message
    ranks_per_sample: int = 1  # train.sequence_parallel: a group of ranks holds each micro-batch


class StopTraining(RuntimeError):
    """A run that ends before its last step on purpose; the command line exits with `exit_code`, message only."""

    exit_code = 1


class Diverged(StopTraining):
    exit_code = 3

    def __init__(self, step: int, what: str, last_good: Path | None = None):
        self.step = step
        kept = (
            f"the last good checkpoint, {last_good}, is kept"
            if last_good
            else "no checkpoint was written before it"
        )
        super().__init__(
            f"training diverged at step {step}: {what}. No adapter was saved; {kept}. Fix: lower train.lr (and "
            "dpo.lr), check the data of that step, or set train.on_nonfinite=skip to skip such steps"
        )


class Interrupted(StopTraining):
    def __init__(self, signum: int, step: int, total: int, checkpoint: Path | None, resume_command: str):
        self.exit_code = 128 + signum
        self.step = step
        name = signal.Signals(signum).name
        where = (
            f"checkpoint {checkpoint}. Resume with the same command and: {resume_command}"
            if checkpoint
            else "no step was completed, so there is nothing to resume: start the run again"
        )
        super().__init__(f"stopped by {name} after step {step} of {total}; {where}")


class StopSignals:
    """While entered (main thread only): the first SIGINT or SIGTERM sets `signum`, which the loop reads at the next
    step boundary; a second SIGINT raises KeyboardInterrupt at once; a SIGTERM while stopping is ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            # os.write: no buffered stream or logging lock inside a signal handler.
            os.write(
                2,
                f"\n{name}: stopping after this step and writing a checkpoint (Ctrl-C again to stop at "
                "once, without one)\n".encode(),
            )
        elif signum == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt(f"second {name}: stopped at once, without a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signum is not None


def global_sum(accelerator: Accelerator, value: int | float) -> float:
    tensor = torch.tensor(float(value), device=accelerator.device, dtype=torch.float64)
    return (
        float(accelerator.reduce(tensor, reduction="sum")) if accelerator.num_processes > 1 else float(value)
    )


def micro_batches(
    make_loader: Callable[[int], object], state: LoopState, accelerator: Accelerator, grad_accum: int
) -> Iterator[list[dict]]:
    """Yield the micro-batches of each optimizer step, epoch after epoch, resuming mid-epoch where the state says.
    A tail of fewer than `grad_accum` micro-batches at the end of an epoch is dropped (a step is always whole)."""
    while True:
        loader = make_loader(state.epoch)
        if state.micro_batches_in_epoch:
            # A loader that generates its batches (GRPO's rollouts) skips them itself.
            skip = getattr(loader, "skip_first_batches", None)
            loader = (
                skip(state.micro_batches_in_epoch)
                if skip
                else accelerator.skip_first_batches(loader, state.micro_batches_in_epoch)
            )
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
    signals: StopSignals | None = None,
    step_guard: Callable[[], AbstractContextManager] = nullcontext,
) -> LoopState:
    """Train until `config.total_steps`; returns the final state. `make_loader(epoch)` builds the (prepared)
    DataLoader of an epoch with its sampler seeded for that epoch; each step runs inside `step_guard()` (the hang
    watchdog of runtime/diagnostics.py). Raises `Diverged` on a non-finite step (module doc) and `Interrupted` after a
    stop asked by `signals`, once its checkpoint is written."""
    model.train()
    progress = tqdm(
        total=config.total_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    counted = ("units", "samples", "tokens", "supervised_tokens")
    window = {"start": time.perf_counter(), "steps": 0, **dict.fromkeys(counted, 0.0)}
    steps = micro_batches(make_loader, state, accelerator, config.grad_accum)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    while state.step < config.total_steps:
        with step_guard():
            group = next(steps)
            record = train_step(
                accelerator,
                model,
                optimizer,
                scheduler,
                group,
                loss_sum,
                count,
                config,
                stop_requested=bool(signals and signals.requested),
            )
        if (
            record is None
        ):  # a stop agreed by every rank, before this step: its batches are fetched again on resume
            progress.close()
            stop(accelerator, state, config, checkpointer, signals)
        if record["nonfinite"] or not math.isfinite(record["loss"]):
            state.nonfinite_steps += 1
            skip = config.on_nonfinite == "skip" and state.nonfinite_steps <= config.max_nonfinite_steps
            if not skip or deepspeed:
                progress.close()
                limit = (
                    "" if config.on_nonfinite == "stop" else f" ({state.nonfinite_steps} non-finite steps)"
                )
                raise Diverged(
                    state.step + 1,
                    f"loss {record['loss']:.4g}, gradient norm {record['grad_norm']:.4g}"
                    f" at learning rate {record['lr']:.3g}{limit}",
                    latest_checkpoint(checkpointer.directory) if checkpointer else None,
                )
            log.warning(
                "step %d: loss %s, gradient norm %s: update skipped (%d of at most %d, "
                "train.max_nonfinite_steps)",
                state.step + 1,
                record["loss"],
                record["grad_norm"],
                state.nonfinite_steps,
                config.max_nonfinite_steps,
            )
        if record.pop("nonfinite"):
            record["skipped_nonfinite"] = 1.0
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
            save_checked(accelerator, checkpointer, state)
        if on_step:
            on_step(state)
    progress.close()
    if signals and global_sum(accelerator, float(signals.requested)) > 0:  # asked during the last step
        stop(accelerator, state, config, checkpointer, signals)
    return state


def save_checked(accelerator, checkpointer: Checkpointer, state: LoopState) -> Path:
    """A checkpoint, unless a trainable parameter is not finite (then `Diverged`: the last good one stays newest)."""
    bad = nonfinite_parameters(accelerator.unwrap_model(checkpointer.model))
    if global_sum(accelerator, len(bad)) > 0:
        raise Diverged(
            state.step,
            f"trainable parameters are not finite ({', '.join(bad[:3]) or 'on another rank'})",
            latest_checkpoint(checkpointer.directory),
        )
    return checkpointer.save(state)


def stop(
    accelerator, state: LoopState, config: LoopConfig, checkpointer: Checkpointer | None, signals
) -> None:
    """Write the checkpoint of `state` (unless written already) and raise `Interrupted` with how to resume."""
    path = None
    if checkpointer and state.step > 0:
        if checkpointer.last_saved_step == state.step:
            path = checkpointer.directory / checkpoint_name(state.step)
        else:
            path = save_checked(accelerator, checkpointer, state)
    # A rank that was not signalled itself knows only that another one was: it reports SIGTERM.
    error = Interrupted(
        signals.signum or signal.SIGTERM, state.step, config.total_steps, path, config.resume_command
    )
    if accelerator.is_main_process:
        log.warning("%s", error)
    raise error


def train_step(
    accelerator, model, optimizer, scheduler, group, loss_sum, count, config, *, stop_requested: bool = False
) -> dict | None:
    """One optimizer step over the micro-batches `group`; returns the step's metrics (`nonfinite`: the gradient norm
    was not finite and the update was not applied), or None, without training, when any rank asked to stop."""
    local_units = sum(count(b) for b in group)
    local_tokens, local_supervised = (sum(n) for n in zip(*(batch_tokens(b) for b in group)))
    if accelerator.num_processes > 1:  # the stop flag rides along with the unit count: one all-reduce
        both = torch.tensor(
            [float(local_units), float(stop_requested)], device=accelerator.device, dtype=torch.float64
        )
        global_units, stops = (float(v) for v in accelerator.reduce(both, reduction="sum"))
    else:
        global_units, stops = float(local_units), float(stop_requested)
    if stops > 0:
        return None
    if global_units == 0:
        raise RuntimeError("an optimizer step has no supervised unit on any rank: check the data's labels")
    scale = accelerator.num_processes * config.grad_accum / global_units
    # Summed on the device in float64 (what adding Python floats did) and read once after the step: no host sync
    # per micro-batch.
    loss_total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    grad_norm = None
    nonfinite = False
    metrics: dict[str, torch.Tensor] = {}
    for batch in group:
        with accelerator.accumulate(model):
            loss, extra = loss_sum(model, batch)
            accelerator.backward(loss * scale)
            loss_total += loss.detach().double()
            for key, value in extra.items():
                value = torch.as_tensor(value, device=accelerator.device).detach().double()
                metrics[key] = metrics[key] + value if key in metrics else value
            if accelerator.sync_gradients:
                # inf: measure the norm without clipping.
                grad_norm = accelerator.clip_grad_norm_(
                    model.parameters(), config.max_grad_norm or float("inf")
                )
                # The norm of the gradients every rank shares: all ranks skip (or stop) alike.
                nonfinite = grad_norm is not None and not math.isfinite(float(grad_norm))
            if not nonfinite:
                optimizer.step()  # accelerate's optimizer wrapper skips the step and zero_grad between boundaries
            if accelerator.sync_gradients:
                # The scheduler is not given to accelerate.prepare, which would step it once per process.
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    # Every rank of a sequence-parallel group holds the same micro-batches: count them once.
    samples = (
        global_sum(accelerator, sum(int(b["input_ids"].shape[0]) for b in group)) / config.ranks_per_sample
    )
    record = {
        "loss": global_sum(accelerator, float(loss_total)) / global_units,
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "units": global_units,
        "samples": samples,
        "nonfinite": nonfinite,
        "tokens": global_sum(accelerator, local_tokens) / config.ranks_per_sample,  # padding excluded
        "supervised_tokens": global_sum(accelerator, local_supervised) / config.ranks_per_sample,
    }
    record.update({k: global_sum(accelerator, float(v)) / global_units for k, v in metrics.items()})
    return record


def throughput(window: dict, state: LoopState, config: LoopConfig) -> dict:
    seconds = max(time.perf_counter() - window["start"], 1e-9)
    per_step = seconds / max(window["steps"], 1)
    return {
        "tokens_per_s": window["tokens"] / seconds,  # all tokens (train/core/tracking.py batch_tokens)
        "supervised_tokens_per_s": window["supervised_tokens"] / seconds,
        **({f"{config.unit_name}_per_s": window["units"] / seconds} if config.unit_name != "tokens" else {}),
        "samples_per_s": window["samples"] / seconds,
        "eta_s": per_step * (config.total_steps - state.step),
        "epoch": state.epoch,
    }


def total_steps_for(
    num_micro_batches_per_epoch: int, grad_accum: int, max_steps: int | None, epochs: float | None
) -> int:
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
