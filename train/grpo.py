"""Reinforcement learning with verifiable rewards (GRPO and its loss family) of Phi-3-Vision, from a YAML recipe.

    accelerate launch train/grpo.py recipes/chartqa_grpo.yaml [key=value ...]
    ./launch.sh recipes/demo_grpo.yaml                      # SFT, then this stage on the same run directory

Starting point (rundir/layout.py `grpo_start`): this run's DPO model when its stages include dpo, else its SFT
model, else the base; the run directory records it (`rundir.weights.write_start`) with the adapters' content hashes. The starting adapters
are merged into the weights and GRPO trains a fresh LoRA on top (`model.language: full` with `grpo.beta: 0` trains
the language model in full instead); the KL reference (`grpo.beta > 0`) is the same network with the adapter
disabled.

Each optimizer step: `grpo.num_generations` completions sampled per prompt with the training model (one vision
pass and one prompt prefill per prompt, the KV cache shared by the G completions), rewarded by the task metrics
(`grpo.rewards`), advantages within each group, TRL's clipped loss on the completion tokens (train/rl/step.py,
train/rl/losses.py, docs/grpo.md).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Recipe
from data.loaders import check_enough, load_samples, plan
from data.sources import SkipCounter
from rundir.layout import adapter_dir, cache_dir, summary_file
from rundir.stage_dir import mark_training_started
from rundir.weights import grpo_start, write_start
from train.core import callbacks, device, trainer
from train.core.checkpoint import data_fingerprint
from train.core.cli import run_cli
from train.core.loop import total_steps_for
from train.core.model_loading import load_policy, save_trained
from train.core.trainable import configure_trainable, report_trainable, upcast_trainable_
from train.rl.losses import check_options
from train.rl.rewards import build_rewards
from train.rl.rollout import TorchRollout
from train.rl.step import GRPOData, GRPOLoss, grpo_parts

log = logging.getLogger("train.grpo")


def sample_table(batches: list[dict], limit: int = 4) -> list[dict]:
    """The best and worst prompt groups of the last generation (by mean reward), with their completions and
    rewards: what the report shows."""
    groups = []
    for batch in batches:
        group = batch["rewards"].numel() // len(batch["examples"])
        for b, example in enumerate(batch["examples"]):
            rows = range(b * group, (b + 1) * group)
            groups.append(
                {
                    "prompt": example.question,
                    "references": list(example.references),
                    "origin": str(example.origin),
                    "mean_reward": float(batch["rewards"][b * group : (b + 1) * group].mean()),
                    "completions": [
                        {"text": batch["texts"][i], "reward": float(batch["rewards"][i])} for i in rows
                    ],
                }
            )
    groups.sort(key=lambda g: g["mean_reward"])
    return groups[-limit:][::-1] + groups[:limit] if len(groups) > 2 * limit else groups[::-1]


def main(
    recipe: Recipe, recipe_path: str | Path | None = None, *, stop_after_step: int | None = None
) -> Path:
    """Run GRPO; returns the run directory. `stop_after_step` ends the run after that step's checkpoint, as a
    preemption would (resume then continues it)."""
    started = time.perf_counter()
    grpo = recipe.grpo
    check_options(
        grpo.loss_type,
        grpo.scale_rewards,
        grpo.epsilon,
        grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high,
        grpo.beta,
    )
    rewards = build_rewards(grpo)  # a bad import path fails before anything loads
    run_dir, accelerator, _ = trainer.open_stage(recipe, recipe_path, "grpo")

    start = grpo_start(recipe, run_dir)
    if accelerator.is_main_process:
        write_start(run_dir, start, "grpo")
    model, processor = load_policy(start, recipe, run_dir, accelerator)

    skips = SkipCounter()
    samples = load_samples(
        recipe.data.train,
        "sft",
        recipe.data,
        seed=recipe.seed,
        skips=skips,
        main_first=accelerator.main_process_first,
    )
    planned = plan(
        samples,
        processor,
        recipe.data,
        skips,
        cache_dir=cache_dir(run_dir),
        progress=accelerator.is_main_process,
        main_first=accelerator.main_process_first,
    )

    parts = grpo_parts(recipe.model)
    model.to(accelerator.device)
    model = configure_trainable(model, parts, recipe.lora, seed=recipe.seed)
    upcast_trainable_(model)
    log.info(report_trainable(model))
    # The rollout's image features serve the loss passes when nothing between the pixels and the features trains,
    # except under FSDP, where they can be computed only inside the model's forward.
    share = (
        parts.vision != "lora"
        and parts.vision != "full"
        and parts.projector == "frozen"
        and not device.model_forward_only(accelerator)
    )
    sharded = accelerator.num_processes > 1 and device.shards_parameters(accelerator)
    engine = TorchRollout(
        processor,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        max_new_tokens=grpo.max_new_tokens,
        stop_strings=grpo.stop_strings,
        synced=sharded,
        share_features=share,
    )
    data = GRPOData(
        recipe,
        planned,
        processor,
        engine,
        rewards,
        model,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        reference=grpo.beta > 0,
    )
    if len(data.sampler) < recipe.train.grad_accum:
        check_enough(len(planned), "grpo", recipe, accelerator.num_processes, skips)
    total_steps = total_steps_for(
        data.batches_per_epoch,
        recipe.train.grad_accum,
        grpo.max_steps or recipe.train.max_steps,
        None if grpo.max_steps else recipe.train.epochs,
    )
    log.info(
        "%d prompts planned, %d completions each, %d micro-batches per rank per epoch, %d optimizer steps",
        len(planned),
        grpo.num_generations,
        data.batches_per_epoch,
        total_steps,
    )

    loss_fn = GRPOLoss(grpo, [reward.name for reward in rewards])
    plan_ = trainer.StagePlan(
        stage="grpo",
        run_dir=run_dir,
        total_steps=total_steps,
        unit_name="tokens" if grpo.loss_type == "dapo" else "completions",
        lr_scale=(grpo.lr / recipe.train.lr) if grpo.lr else 1.0,
        data_fingerprint=data_fingerprint(planned),
    )
    every = callbacks.eval_every_steps(
        "grpo", processor, recipe, run_dir, accelerator=accelerator, total_steps=total_steps
    )
    stop = callbacks.stop_after(stop_after_step)
    mark_training_started(run_dir, "grpo")  # a failure from here on keeps the stage folder
    model, state = trainer.fit(
        accelerator,
        recipe,
        model,
        plan_,
        make_loader=data.make_loader,
        loss_sum=loss_fn,
        count=loss_fn.count,
        callbacks=[c for c in (every, stop) if c is not None],
    )

    trained = save_trained(
        accelerator,
        model,
        processor,
        adapter_dir(run_dir, "grpo"),
        recipe=recipe,
        run_dir=run_dir,
        applies_after=start.adapters,
    )
    trainer.write_summary(
        run_dir,
        "grpo",
        state,
        skips,
        started,
        accelerator,
        trained,
        sampled_groups=sample_table(data.last_batches),
    )
    callbacks.run_eval_hook(
        "grpo",
        accelerator.unwrap_model(model),
        processor,
        recipe,
        run_dir,
        base_path=start.base,
        accelerator=accelerator,
        step=state.step,
    )
    if accelerator.is_main_process:
        log.info("GRPO summary: %s", summary_file(run_dir, "grpo"))
    return trainer.finish(accelerator, run_dir)


def cli(argv: list[str] | None = None) -> None:
    """The command line: exits 0, or 2 with the message alone on a user error (`--debug` for the traceback)."""
    run_cli(main, __doc__, argv, prog="train/grpo.py")


if __name__ == "__main__":
    cli()
