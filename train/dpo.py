"""Preference tuning (DPO and its loss family) of Phi-3-Vision after SFT, from a YAML recipe.

    accelerate launch train/dpo.py recipes/rlaif_v.yaml [key=value ...]
    ./launch.sh recipes/demo.yaml                          # SFT, then this stage on the same run directory

Starting point (rundir/layout.py `dpo_start`): `dpo.from_sft` (an SFT run directory or adapter), else this run's
SFT model when the recipe's stages include sft, else the base model; the run directory records it
(`rundir.weights.write_start`) with the SFT adapter's content hash. The SFT adapter is merged into the weights; DPO trains a fresh LoRA on top (the language
model, and the CLIP tower when `model.vision: lora`; everything else is frozen), and the reference model is the same
network with the adapter disabled: exactly the SFT policy, no second copy in memory.

One vision pass per pair (train/core/losses.py `DPOLoss`). The loss is summed over pairs and divided by the pairs of the
whole optimizer step (train/core/loop.py).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Recipe
from data.loaders import stage_loaders
from data.sources import SkipCounter
from rundir.atomic import write_json_atomically
from rundir.layout import adapter_dir, cache_dir, preference_eval_file
from rundir.stage_dir import mark_training_started
from rundir.weights import dpo_start, write_start
from train.core import callbacks, device, sequence_groups, trainer
from train.core.checkpoint import data_fingerprint
from train.core.cli import run_cli
from train.core.loop import total_steps_for
from train.core.model_loading import load_policy, save_trained
from train.core.trainable import configure_trainable, dpo_parts, report_trainable, upcast_trainable_
from train.preference import reference_cache
from train.preference.heldout_accuracy import preference_eval
from train.preference.stage_loss import DPOLoss, count_pairs

log = logging.getLogger("train.dpo")


CHOSEN_FALL_NATS = (
    0.25  # a smaller fall of the chosen log-prob is step-to-step noise (seen on the demo: +-0.5)
)


def chosen_trend(history: list[dict]) -> tuple[float, float] | None:
    """(change of the chosen completions' mean log-prob, change of the mean reward margin) from the first third of
    the logged steps to the last third (means: single logged steps are noisy), or None with fewer than two."""
    logged = [h for h in history if "logps/chosen" in h and "rewards/margins" in h]
    if len(logged) < 2:
        return None
    third = max(1, len(logged) // 3)

    def mean(rows: list[dict], key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    early, late = logged[:third], logged[-third:]
    return (
        mean(late, "logps/chosen") - mean(early, "logps/chosen"),
        mean(late, "rewards/margins") - mean(early, "rewards/margins"),
    )


def warn_if_chosen_falls(history: list[dict]) -> None:
    """DPO widens the margin by pushing the rejected answers down, but it may push the chosen ones down too: the
    policy then prefers the right answer over the wrong one while making both less likely, and a task score can
    fall while the preference accuracy rises. Say so, with the RPO term as the remedy."""
    trend = chosen_trend(history)
    if trend is not None and trend[0] < -CHOSEN_FALL_NATS and trend[1] > 0:
        log.warning(
            "DPO: the chosen answers' log-prob fell by %.3f nats while the reward margin grew by %.3f: the "
            "policy is making the preferred answers less likely too, which can lower task scores; "
            "dpo.sft_weight (RPO's NLL term on the chosen answers, e.g. 1.0) keeps them likely",
            -trend[0],
            trend[1],
        )


def main(
    recipe: Recipe, recipe_path: str | Path | None = None, *, stop_after_step: int | None = None
) -> Path:
    """Run DPO; returns the run directory. `stop_after_step` ends the run after that step's checkpoint, as a
    preemption would (resume then continues it)."""
    started = time.perf_counter()
    run_dir, accelerator, _ = trainer.open_stage(recipe, recipe_path, "dpo")

    start = dpo_start(recipe, run_dir)
    if accelerator.is_main_process:
        write_start(run_dir, start)
    model, processor = load_policy(start, recipe, run_dir, accelerator)
    if "sft" not in recipe.stages and not trainer.resumes(
        recipe, run_dir, "dpo"
    ):  # no SFT stage scored the base
        callbacks.score_base_before_dpo(start, model, processor, recipe, run_dir, accelerator=accelerator)

    sp, split = sequence_groups.layout(accelerator, recipe.train.sequence_parallel)
    skips = SkipCounter()
    planned, make_loader, batches_per_epoch = stage_loaders(
        recipe,
        processor,
        "dpo",
        skips,
        num_replicas=split.replicas,
        rank=split.rank,
        main_first=accelerator.main_process_first,
        cache_dir=cache_dir(run_dir),
    )
    total_steps = total_steps_for(
        batches_per_epoch,
        recipe.train.grad_accum,
        recipe.dpo.max_steps or recipe.train.max_steps,
        None if recipe.dpo.max_steps else recipe.train.epochs,
    )
    log.info(
        "%d pairs planned, %d micro-batches per rank per epoch, %d optimizer steps",
        len(planned),
        batches_per_epoch,
        total_steps,
    )

    parts = dpo_parts(recipe.model)
    model.to(accelerator.device)
    reference_table = None
    if recipe.dpo.precompute_ref_logps:  # before the fresh adapter exists: the model is the reference
        reference_table = reference_cache.reference_logps(
            model, processor, planned, recipe, start, run_dir, accelerator
        )
    model = configure_trainable(model, parts, recipe.lora, seed=recipe.seed)
    upcast_trainable_(model)
    log.info(report_trainable(model))
    # A frozen tower's image features are computed once per pair, outside the passes, except under FSDP, where
    # they can be computed only inside the model's forward (train.core.device.model_forward_only): there each pass
    # encodes its images (two vision passes per pair, the same values).
    share = parts.vision != "lora" and not device.model_forward_only(accelerator)
    sequence_groups.attach(model, sp)
    loss_fn = DPOLoss(recipe, accelerator, share_features=share, reference_table=reference_table, sp=sp)

    plan = trainer.StagePlan(
        stage="dpo",
        run_dir=run_dir,
        total_steps=total_steps,
        unit_name="pairs",
        lr_scale=(recipe.dpo.lr / recipe.train.lr) if recipe.dpo.lr else 1.0,
        data_fingerprint=data_fingerprint(planned),
    )
    every = callbacks.eval_every_steps(
        "dpo", processor, recipe, run_dir, accelerator=accelerator, total_steps=total_steps
    )
    stop = callbacks.stop_after(stop_after_step)
    mark_training_started(run_dir, "dpo")  # a failure from here on keeps the stage folder
    model, state = trainer.fit(
        accelerator,
        recipe,
        model,
        plan,
        make_loader=make_loader,
        loss_sum=loss_fn,
        count=functools.partial(count_pairs, sp=sp),
        callbacks=[c for c in (every, stop) if c is not None],
    )

    if accelerator.is_main_process:
        warn_if_chosen_falls(state.history)
    trained = save_trained(
        accelerator,
        model,
        processor,
        adapter_dir(run_dir, "dpo"),
        recipe=recipe,
        run_dir=run_dir,
        applies_after=start.adapters,
    )
    trainer.write_summary(run_dir, "dpo", state, skips, started, accelerator, trained)
    held_out = preference_eval(accelerator, model, processor, recipe, device=accelerator.device)
    if held_out and accelerator.is_main_process:
        write_json_atomically(preference_eval_file(run_dir), held_out)
        log.info("held-out preferences: %s", held_out)
    if held_out:
        accelerator.log(
            {
                f"eval/preference/{policy}/{key}": value
                for policy, scores in held_out.items()
                for key, value in scores.items()
            },
            step=state.step,
        )
    callbacks.run_eval_hook(
        "dpo",
        accelerator.unwrap_model(model),
        processor,
        recipe,
        run_dir,
        base_path=start.base,
        accelerator=accelerator,
        step=state.step,
    )
    return trainer.finish(accelerator, run_dir)


def cli(argv: list[str] | None = None) -> None:
    """The command line: exits 0, or 2 with the message alone on a user error (`--debug` for the traceback)."""
    run_cli(main, __doc__, argv, prog="train/dpo.py")


if __name__ == "__main__":
    cli()
