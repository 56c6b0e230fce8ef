"""Held-out preference accuracy of a DPO run: on the recipe's `data.eval` preference sources, how often the DPO
policy, and the SFT policy it started from (the adapter disabled), give the chosen completion the higher log-prob,
and the mean log-prob margin."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace

import torch

from config import Recipe
from data.loaders import load_samples, loader_factory, plan, stage_sources
from data.sources import SkipCounter
from train.core.device import model_forward_only, to_device
from train.preference.stage_loss import DPOLoss, count_pairs, pair_logps

log = logging.getLogger(__name__)


@torch.no_grad()
def preference_eval(accelerator, model, processor, recipe: Recipe, *, device) -> dict | None:
    """Held-out preference accuracy (log p(chosen) > log p(rejected)) and mean log-prob margin of the DPO policy and
    of the SFT policy it started from (the adapter disabled), on the recipe's `data.eval` preference sources."""
    if not stage_sources(recipe.data.eval, "dpo"):
        return None
    skips = SkipCounter()
    samples = load_samples(
        recipe.data.eval,
        "dpo",
        recipe.data,
        seed=recipe.seed,
        skips=skips,
        main_first=accelerator.main_process_first,
    )
    planned = plan(samples, processor, replace(recipe.data, on_bad_sample="skip", on_overlong="drop"), skips)
    if len(planned) < accelerator.num_processes:  # the same on every rank: all skip together
        log.warning(
            "held-out preference eval skipped: %d pair(s) for %d rank(s)",
            len(planned),
            accelerator.num_processes,
        )
        return None
    # The sampler leaves out a tail shorter than one batch per rank: never let that be every pair.
    batch_size = min(recipe.eval.batch_size, len(planned) // accelerator.num_processes)
    make_loader, _ = loader_factory(
        planned,
        processor,
        replace(recipe.data, group_by_length=False),
        stage="dpo",
        micro_batch_size=batch_size,
        seed=recipe.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    peft_model = accelerator.unwrap_model(model)
    was_training = peft_model.training
    peft_model.eval()
    margins = {"dpo": [], "sft": []}
    for batch in make_loader(0):
        batch = to_device(batch, device)
        kwargs, _ = DPOLoss.image_kwargs_for(
            peft_model, batch, share_features=not model_forward_only(accelerator)
        )
        pairs = count_pairs(batch)
        for which, context in (("dpo", nullcontext()), ("sft", peft_model.disable_adapter())):
            with context:
                logps, _ = pair_logps(peft_model, batch, kwargs)
            margins[which].append(logps[:pairs] - logps[pairs:])
    peft_model.train(was_training)
    result = {}
    for which, values in margins.items():
        local = torch.cat(values)
        gathered = accelerator.gather_for_metrics(local) if accelerator.num_processes > 1 else local
        result[which] = {
            "pairs": int(gathered.numel()),
            "accuracy": float((gathered > 0).float().mean()),
            "mean_margin": float(gathered.mean()),
        }
    return result
