"""Preference tuning (DPO and its loss family) of Phi-3-Vision after SFT, from a YAML recipe.

    accelerate launch train/dpo.py recipes/rlaif_v.yaml [key=value ...]
    ./launch.sh recipes/demo.yaml                          # SFT, then this stage on the same run directory

Starting point: `dpo.from_sft` (an SFT run directory or adapter), else this run's `sft/` when the recipe's stages
include sft, else the base model. The SFT adapter is merged into the weights; DPO trains a fresh LoRA on top (the
language model, and the CLIP tower when `model.vision: lora`; everything else is frozen), and the reference model
is the same network with the adapter disabled: exactly the SFT policy, no second copy in memory (DESIGN.md
decision 5). `dpo/start.json` records the starting point and the SFT adapter's content hash.

One vision pass per pair (decision 6): chosen and rejected share the prompt's image; the batch carries it once, its
features are computed once and reused for both completions and, the tower being frozen (or LoRA-free), for the
reference pass. The loss is summed over pairs and divided by the pairs of the whole optimizer step (train/loop.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import models
from data.sources import SkipCounter
from train import common, reference_cache, stage
from train.data import load_samples, loader_factory, plan, stage_loaders
from train.dpo_losses import combined_loss, reward_metrics
from train.eval_hook import run_eval_hook
from train.loop import total_steps_for
from train.parts import configure_trainable
from train.recipe import load_recipe
from train.recipe_schema import ModelSection, Recipe

log = logging.getLogger("train.dpo")


# ---------------------------------------------------------------------------------------------- starting point


def starting_point(recipe: Recipe, run_dir: Path) -> dict:
    """{"base": path or hub id, "revision", "sft_adapter": folder or None} for this DPO run."""
    source = Path(recipe.dpo.from_sft) if recipe.dpo.from_sft else (run_dir if "sft" in recipe.stages else None)
    if source is None:
        return {"base": common.base_path(recipe.model, run_dir), "revision": recipe.model.revision, "sft_adapter": None}
    if (source / "adapter_config.json").exists():
        adapter, sft_run = source, source.parent.parent
    elif (source / "sft" / "adapter").is_dir():
        adapter, sft_run = source / "sft" / "adapter", source
    elif (source / "sft" / "merged" / "config.json").exists():  # SFT trained in full
        return {"base": str(source / "sft" / "merged"), "revision": None, "sft_adapter": None}
    else:
        raise FileNotFoundError(f"dpo starting point {source}: no SFT adapter (sft/adapter/) or merged model there")
    sft_recipe = load_recipe(sft_run / "recipe.resolved.yaml") if (sft_run / "recipe.resolved.yaml").exists() else recipe
    return {"base": common.base_path(sft_recipe.model, sft_run), "revision": sft_recipe.model.revision, "sft_adapter": str(adapter)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_policy(start: dict, recipe: Recipe, run_dir: Path, accelerator):
    """The SFT policy: the base with the SFT adapter merged in (or the base itself, built first for `tiny`)."""
    if start["sft_adapter"] is None and start["base"] in (recipe.model.name_or_path, str(run_dir / "base")):
        model, processor, _ = common.load_model(recipe.model, run_dir, seed=recipe.seed, accelerator=accelerator)
        return model, processor
    model_section = recipe.model
    model, processor = models.load(start["base"], revision=start["revision"], dtype=model_section.dtype,
                                   attn_implementation=model_section.attn_implementation,
                                   num_crops=model_section.num_crops)
    if start["sft_adapter"]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, start["sft_adapter"]).merge_and_unload()
    return model, processor


def dpo_parts(model_section: ModelSection) -> ModelSection:
    """DPO trains LoRA only (the reference is the adapter-disabled network): the language model always, the tower
    when the recipe puts LoRA there; the projector and every full part stay frozen."""
    return replace(model_section, language="lora", vision="lora" if model_section.vision == "lora" else "frozen",
                   projector="frozen")


# ---------------------------------------------------------------------------------------------- the loss


def completion_logps(model, batch: dict, image_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of each row's supervised tokens; only those positions get logits."""
    targets = batch["labels"][:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    # use_cache=False: no cache in training, and with packed position_ids a cache would let samples see each other.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False, **image_kwargs).logits
    targets = targets[:, keep]
    mask = targets != -100
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


class DPOLoss:
    """Per micro-batch: the summed preference loss of its pairs and summed metrics (the loop averages per pair).

    `reference_table` (pairs x 2, from train/reference_cache.py) replaces the reference pass when given.
    `dpo.mdpo_weight` adds mDPO's image-conditional term (Wang et al. 2024): the chosen answer must become more
    likely, relative to the reference, with the real image than with a corrupted one,
    -log sigmoid(beta * [(pi - ref)(chosen | image) - (pi - ref)(chosen | corrupted image)]). The paper corrupts by
    cropping to under 20% of the image; here a random 80% of each crop is masked white, which keeps the crop grid
    and so the image's token count.
    """

    def __init__(self, recipe: Recipe, accelerator, share_features: bool, reference_table: torch.Tensor | None = None):
        self.dpo, self.accelerator, self.share_features = recipe.dpo, accelerator, share_features
        self.reference_table = reference_table
        self.generator = torch.Generator().manual_seed(recipe.seed)

    @staticmethod
    def image_kwargs_for(peft_model, batch: dict, share_features: bool) -> tuple[dict, dict]:
        """(policy kwargs, reference kwargs). With a frozen tower the images are encoded once, here, for all four
        uses (chosen, rejected, policy, reference); otherwise the policy pass encodes them with its adapters on and
        the reference pass again with them off (still once for chosen and rejected together)."""
        if "pixel_values" not in batch:
            return {}, {}
        seq = batch["sequence_images"]
        if share_features:
            with torch.no_grad():
                features = peft_model.get_base_model().model.vision_embed_tokens(batch["pixel_values"], batch["image_sizes"])
            shared = {"image_features": features, "sequence_images": seq}
            return shared, shared
        pixels = {"pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"], "sequence_images": seq}
        return pixels, pixels

    def reference(self, peft_model, batch: dict, kwargs: dict) -> torch.Tensor:
        if self.reference_table is not None:
            table = self.reference_table.to(batch["input_ids"].device)[batch["indices"]]
            return torch.cat([table[:, 0], table[:, 1]])
        with torch.no_grad(), peft_model.disable_adapter():
            return completion_logps(peft_model, batch, kwargs)[0]

    def corrupted(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Each uint8 crop with a random 80% of its 8x8-pixel cells set to white."""
        crops, _, size, _ = pixel_values.shape
        cells = -(-size // 8)
        keep = torch.rand(crops, 1, cells, cells, generator=self.generator) < 0.2
        keep = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :size, :size].to(pixel_values.device)
        return torch.where(keep, pixel_values, torch.full_like(pixel_values, 255))

    def conditional_term(self, model, peft_model, batch: dict, policy_chosen, reference_chosen) -> torch.Tensor:
        """mDPO's per-pair term on the chosen rows with corrupted images."""
        pairs = batch["input_ids"].shape[0] // 2
        chosen = {k: batch[k][:pairs] for k in ("input_ids", "attention_mask", "labels")}
        corrupted = {**batch, "pixel_values": self.corrupted(batch["pixel_values"])}
        kwargs, ref_kwargs = self.image_kwargs_for(peft_model, corrupted, self.share_features)
        kwargs = {**kwargs, "sequence_images": batch["sequence_images"][:pairs]}
        ref_kwargs = {**ref_kwargs, "sequence_images": batch["sequence_images"][:pairs]}
        policy_corrupted, _ = completion_logps(model, chosen, kwargs)
        with torch.no_grad(), peft_model.disable_adapter():
            reference_corrupted, _ = completion_logps(peft_model, chosen, ref_kwargs)
        margin = (policy_chosen - reference_chosen) - (policy_corrupted - reference_corrupted)
        return -F.logsigmoid(self.dpo.beta * margin)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        peft_model = self.accelerator.unwrap_model(model)
        policy_kwargs, reference_kwargs = self.image_kwargs_for(peft_model, batch, self.share_features)
        policy_logps, num_tokens = completion_logps(model, batch, policy_kwargs)
        reference_logps = self.reference(peft_model, batch, reference_kwargs)
        pairs = batch["input_ids"].shape[0] // 2
        chosen, rejected = slice(0, pairs), slice(pairs, 2 * pairs)
        losses, metrics = combined_loss(
            [(loss.type, loss.weight) for loss in self.dpo.losses],
            policy_logps[chosen], policy_logps[rejected], reference_logps[chosen], reference_logps[rejected],
            beta=self.dpo.beta, label_smoothing=self.dpo.label_smoothing,
            chosen_num_tokens=num_tokens[chosen], rejected_num_tokens=num_tokens[rejected],
            sft_weight=self.dpo.sft_weight,
            # RPO's SFT term: the chosen completion's mean token NLL, per pair.
            chosen_nll_per_pair=(-policy_logps[chosen] / num_tokens[chosen].clamp_min(1)) if self.dpo.sft_weight else None,
        )
        if self.dpo.mdpo_weight and "pixel_values" in batch:
            conditional = self.conditional_term(model, peft_model, batch, policy_logps[chosen], reference_logps[chosen])
            losses = losses + self.dpo.mdpo_weight * conditional
            metrics["loss/mdpo"] = conditional.detach().mean()
        metrics.update(reward_metrics(policy_logps[chosen], policy_logps[rejected], reference_logps[chosen],
                                      reference_logps[rejected], beta=self.dpo.beta))
        # The loop divides metric sums by the step's pairs: hand it sums.
        return losses.sum(), {k: float(v) * pairs for k, v in metrics.items()}


def count_pairs(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


@torch.no_grad()
def preference_eval(accelerator, model, processor, recipe: Recipe, *, device) -> dict | None:
    """Held-out preference accuracy (log p(chosen) > log p(rejected)) and mean log-prob margin of the DPO policy and
    of the SFT policy it started from (the adapter disabled), on the recipe's `data.eval` preference sources."""
    from train.data import stage_sources

    if not stage_sources(recipe.data.eval, "dpo"):
        return None
    skips = SkipCounter()
    samples = load_samples(recipe.data.eval, "dpo", recipe.data, seed=recipe.seed, skips=skips,
                           main_first=accelerator.main_process_first)
    planned = plan(samples, processor, replace(recipe.data, on_bad_sample="skip", on_overlong="drop"), skips)
    make_loader, _ = loader_factory(planned, processor, replace(recipe.data, group_by_length=False), stage="dpo",
                                    micro_batch_size=recipe.eval.batch_size, seed=recipe.seed,
                                    num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    peft_model = accelerator.unwrap_model(model)
    was_training = peft_model.training
    peft_model.eval()
    margins = {"dpo": [], "sft": []}
    for batch in make_loader(0):
        batch = common.to_device(batch, device)
        kwargs, _ = DPOLoss.image_kwargs_for(peft_model, batch, share_features=True)
        pairs = count_pairs(batch)
        for which, context in (("dpo", nullcontext()), ("sft", peft_model.disable_adapter())):
            with context:
                logps, _ = completion_logps(peft_model, batch, kwargs)
            margins[which].append(logps[:pairs] - logps[pairs:])
    peft_model.train(was_training)
    result = {}
    for which, values in margins.items():
        local = torch.cat(values)
        gathered = accelerator.gather_for_metrics(local) if accelerator.num_processes > 1 else local
        result[which] = {"pairs": int(gathered.numel()), "accuracy": float((gathered > 0).float().mean()),
                         "mean_margin": float(gathered.mean())}
    return result


# ---------------------------------------------------------------------------------------------- the stage


def main(recipe: Recipe, recipe_path: str | Path | None = None, *, stop_after_step: int | None = None) -> Path:
    """Run DPO; returns the run directory. `stop_after_step` ends the run after that step's checkpoint, as a
    preemption would (resume then continues it)."""
    started = time.perf_counter()
    run_dir, accelerator, stage_dir = stage.open_stage(recipe, recipe_path, "dpo")
    device = accelerator.device

    start = starting_point(recipe, run_dir)
    if start["sft_adapter"]:
        start["sft_adapter_sha256"] = file_sha256(Path(start["sft_adapter"]) / "adapter_model.safetensors")
    if accelerator.is_main_process:
        (stage_dir / "start.json").write_text(json.dumps(start, indent=1) + "\n")
    model, processor = load_policy(start, recipe, run_dir, accelerator)

    skips = SkipCounter()
    planned, make_loader, batches_per_epoch = stage_loaders(recipe, processor, "dpo", accelerator, skips)
    total_steps = total_steps_for(batches_per_epoch, recipe.train.grad_accum,
                                  recipe.dpo.max_steps or recipe.train.max_steps,
                                  None if recipe.dpo.max_steps else recipe.train.epochs)
    log.info("%d pairs planned, %d micro-batches per rank per epoch, %d optimizer steps", len(planned),
             batches_per_epoch, total_steps)

    parts = dpo_parts(recipe.model)
    model.to(device)
    reference_table = None
    if recipe.dpo.precompute_ref_logps:  # before the fresh adapter exists: the model is the reference
        reference_table = reference_cache.reference_logps(model, processor, planned, recipe, start, run_dir, stage_dir,
                                                          accelerator)
    model = configure_trainable(model, parts, recipe.lora, seed=recipe.seed)
    common.upcast_trainable_(model)
    log.info(common.report_trainable(model))
    loss_fn = DPOLoss(recipe, accelerator, share_features=parts.vision != "lora", reference_table=reference_table)

    model, state = stage.fit(accelerator, recipe, model, make_loader=make_loader, loss_sum=loss_fn, count=count_pairs,
                             total_steps=total_steps, stage_dir=stage_dir, run_dir=run_dir, unit_name="pairs",
                             lr_scale=(recipe.dpo.lr / recipe.train.lr) if recipe.dpo.lr else 1.0,
                             stop_after_step=stop_after_step, processor=processor, stage="dpo")

    trained = common.save_trained(accelerator, model, processor, stage_dir / "adapter")
    stage.write_summary(stage_dir, state, skips, started, accelerator, trained)
    held_out = preference_eval(accelerator, model, processor, recipe, device=device)
    if held_out and accelerator.is_main_process:
        (stage_dir / "preference_eval.json").write_text(json.dumps(held_out, indent=1) + "\n")
        log.info("held-out preferences: %s", held_out)
    run_eval_hook("dpo", accelerator.unwrap_model(model), processor, recipe, run_dir, base_path=start["base"],
                  accelerator=accelerator)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"run directory: {run_dir}")
    return run_dir


def cli(argv: list[str] | None = None) -> Path:
    return stage.cli(main, __doc__, argv)


if __name__ == "__main__":
    cli()
