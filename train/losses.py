"""The losses the training stages bring to the loop: SFT's summed token cross-entropy, and DPO's preference losses
on completion log-probs (the loss family itself is in train/dpo_losses.py).

Each returns the SUM of its per-unit losses (units: supervised tokens for SFT, pairs for DPO) and the loop divides
by the units of the whole optimizer step (train/loop.py). Only positions whose next token is supervised get logits
(`logits_to_keep`): with a 2,500-token image, that skips the vocabulary projection of ~99% of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.render import IGNORE_INDEX
from recipe import Recipe
from train.dpo_losses import combined_loss, reward_metrics, sft_nll_per_pair

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over supervised tokens."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # positions t whose next token is supervised somewhere
    logits = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, keep].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, {}


def supervised_tokens(batch: dict) -> int:
    return int(batch["num_supervised_tokens"])


def completion_logps(model, batch: dict, image_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of each row's supervised tokens; only those positions get logits."""
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    # use_cache=False: no cache in training, and with packed position_ids a cache would let samples see each other.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   use_cache=False, **image_kwargs).logits
    targets = targets[:, keep]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


class DPOLoss:
    """Per micro-batch: the summed preference loss of its pairs and summed metrics (the loop averages per pair).

    `reference_table` (pairs x 2, from train/reference_cache.py) replaces the reference pass when given.
    One vision pass per pair: chosen and rejected share the prompt's image; the batch carries it once, its features
    are computed once and reused for both completions and, the tower being frozen (or LoRA-free), for the reference
    pass.
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
            chosen_nll_per_pair=sft_nll_per_pair(policy_logps[chosen], num_tokens[chosen], num_pairs=1,
                                                 num_tokens=num_tokens[chosen]) if self.dpo.sft_weight else None,
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
