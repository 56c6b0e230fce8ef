"""The GRPO stage's part of the dry run (train/tools/dry_run.py): the recipe's fixture prompts, one generation of
`grpo.num_generations` completions each from the tiny model (at most 8 tokens), scored by the recipe's rewards (a
user's function is imported and called), advantages, the recipe's loss, one backward.

The tiny model is random, so its completions rarely earn a metric reward: when every group's rewards are equal the
advantages are 0 and so is the gradient (GRPO learns nothing from such a batch); the non-zero-gradient check then
does not apply, and the summary says so (`zero_advantage`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from config import ModelSection, Recipe
from data.loaders import plan
from data.sample import SFTSample
from data.sources import SkipCounter
from train.core.trainable import check_gradients, trained_parts
from train.rl.rewards import build_rewards
from train.rl.rollout import TorchRollout
from train.rl.step import GRPOData, GRPOLoss

DRY_RUN_TOKENS = 8


def grpo_fixture_step(
    recipe: Recipe, samples: Sequence[SFTSample], model, processor, parts: ModelSection
) -> dict[str, Any]:
    """One generation, the rewards, the loss and its backward on the fixture prompts `samples`, with `model` (the
    tiny model with GRPO's trained parts, `grpo_parts`); the stage's summary (without the sources)."""
    grpo = dataclasses.replace(recipe.grpo, max_new_tokens=min(recipe.grpo.max_new_tokens, DRY_RUN_TOKENS))
    recipe = dataclasses.replace(recipe, grpo=grpo, data=dataclasses.replace(recipe.data, num_workers=0))
    planned = plan(samples, processor, recipe.data, SkipCounter(), progress=False)
    rewards = build_rewards(grpo)
    engine = TorchRollout(
        processor,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        max_new_tokens=grpo.max_new_tokens,
        stop_strings=grpo.stop_strings,
        share_features=parts.vision == "frozen" and parts.projector == "frozen",
    )
    data = GRPOData(
        recipe, planned, processor, engine, rewards, model, num_replicas=1, rank=0, reference=grpo.beta > 0
    )
    batch = data.generate([list(range(len(planned)))], epoch=0)[0]
    loss_fn = GRPOLoss(grpo, [reward.name for reward in rewards])
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train.precision == "bf16")
    with precision:
        loss_sum, metrics = loss_fn(model, batch)
    units = loss_fn.count(batch)
    loss = loss_sum / units
    if not bool(torch.isfinite(loss)):
        raise RuntimeError(f"dry run: the grpo loss of the fixture batch is {float(loss)}, not finite")
    loss.backward()
    zero_advantage = bool((batch["advantages"] == 0).all())
    if not zero_advantage:
        check_gradients(model, trained_parts(parts))
    return {
        "batch": {key: list(value.shape) for key, value in batch.items() if isinstance(value, torch.Tensor)},
        "completions": len(batch["texts"]),
        "units": units,
        "loss": round(loss.item(), 6),
        "rewards": {
            name: round(float(metrics[f"rewards/{name}/mean"]) / units, 6) for name in loss_fn.reward_names
        },
        "zero_advantage": zero_advantage,
        "trained_parts": sorted(trained_parts(parts)),
    }
