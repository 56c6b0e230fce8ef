"""DPO's stage loss: per micro-batch of pairs, the summed preference loss (the loss family is
train/preference/losses.py) on completion log-probs, with one vision pass and one prompt pass per pair.

DPO shares each pair's prompt between its chosen and rejected completions (`pair_logps`): one row per pair,
`prompt + chosen + rejected`, under a block mask where the rejected tokens do not see the chosen ones
(`data.collate.shared_layout`). The prompt (most of the tokens: the image slots) then goes through the LM once per
pass instead of twice, and its gradient is exact: both completions read the same prompt activations, and the
backward sums what flows into them from both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from config import Recipe
from models.phi3v.modeling import several_processes
from models.phi3v.sequence_parallel import SequenceParallel
from train.core.losses import (
    attn_implementation,
    completion_logps,
    kept_token_logps,
    prefix_sharing_mask,
    splitting,
    unwrapped,
)
from train.preference.losses import combined_loss, reward_metrics, sft_nll_per_pair


def shares_prompt(model, batch: dict) -> bool:
    """Whether `pair_logps` runs the prefix-sharing layout: the collator built it (no pair of the batch has its own
    rejected images), and the attention takes a block mask (sdpa, eager; flash-attention-2 does not)."""
    return "shared_input_ids" in batch and attn_implementation(model) in ("sdpa", "eager")


def shared_completion_logps(
    model, batch: dict, image_kwargs: dict, sp: SequenceParallel | None = None, real_tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `completion_logps` returns for the 2B rows, from the prefix-sharing layout: B rows, one LM pass over
    each prompt for both completions; with SDPA the decoder runs on the real tokens only and the last layer at the
    kept positions (models/phi3v/supervised_forward.py; `real_tokens=False`: the model's forward)."""
    from data.collate import SEGMENT_PAD

    pairs = batch["shared_input_ids"].shape[0]
    kwargs = dict(image_kwargs)
    if "sequence_images" in kwargs:  # row b holds pair b's prompt images once: those of its chosen row
        kwargs["sequence_images"] = kwargs["sequence_images"][:pairs]
    dtype = unwrapped(model).get_input_embeddings().weight.dtype
    mask = prefix_sharing_mask(batch["shared_segments"], attn_implementation(model), dtype)
    with splitting(sp):
        logits = model(
            input_ids=batch["shared_input_ids"],
            attention_mask=mask,
            position_ids=batch["shared_position_ids"],
            logits_to_keep=batch["shared_keep"],
            use_cache=False,
            real_tokens=(batch["shared_segments"] != SEGMENT_PAD) if real_tokens else False,
            **kwargs,
        ).logits  # (N, V): each kept position once
    logps = kept_token_logps(
        logits, batch["shared_keep"], batch["shared_token_index"], batch["shared_targets"], sp
    )
    sequence = batch["shared_sequence"]
    sums = torch.zeros(2 * pairs, dtype=torch.float32, device=logits.device).index_add(0, sequence, logps)
    return sums, batch["shared_counts"]


def pair_logps(
    model, batch: dict, image_kwargs: dict, sp: SequenceParallel | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of the 2B completions (chosen 0..B-1, rejected B..2B-1): from the
    prefix-sharing layout where `shares_prompt`, else from the 2B-row layout; the same values either way
    (tests/train/test_dpo_shared_prompt.py). Under sequence parallelism every rank of the group gets the whole sums."""
    if shares_prompt(model, batch):
        return shared_completion_logps(model, batch, image_kwargs, sp)
    return completion_logps(model, batch, image_kwargs, sp)


class DPOLoss:
    """Per micro-batch: the summed preference loss of its pairs and summed metrics (the loop averages per pair).

    `reference_table` (pairs x 2, from train/preference/reference_cache.py) replaces the reference pass when given.
    One vision pass per pair: chosen and rejected share the prompt's image; the batch carries it once, its features
    are computed once and reused for both completions and, the tower being frozen (or LoRA-free), for the reference
    pass.
    `dpo.mdpo_weight` adds mDPO's image-conditional term (Wang et al. 2024): the chosen answer must become more
    likely, relative to the reference, with the real image than with a corrupted one,
    -log sigmoid(beta * [(pi - ref)(chosen | image) - (pi - ref)(chosen | corrupted image)]). The paper corrupts by
    cropping to under 20% of the image; here a random 80% of each crop is masked white, which keeps the crop grid
    and so the image's token count.
    """

    def __init__(
        self,
        recipe: Recipe,
        accelerator,
        share_features: bool,
        reference_table: torch.Tensor | None = None,
        sp: SequenceParallel | None = None,
    ):
        self.dpo, self.accelerator, self.share_features = recipe.dpo, accelerator, share_features
        self.reference_table = reference_table
        # Under sequence parallelism every rank of a group computes its pairs' whole loss from the summed log-probs;
        # the group's first rank counts it (loss, metrics, pairs), the others' gradients flow through the sums.
        self.sp, self.weight = sp, 1.0 if sp is None or sp.is_owner else 0.0
        self.generator = torch.Generator().manual_seed(recipe.seed)

    @staticmethod
    def image_kwargs_for(peft_model, batch: dict, share_features: bool) -> tuple[dict, dict]:
        """(policy kwargs, reference kwargs). With a frozen tower the images are encoded once, here, for all four
        uses (chosen, rejected, policy, reference); otherwise the policy pass encodes them with its adapters on and
        the reference pass again with them off (still once for chosen and rejected together)."""
        if "pixel_values" not in batch:
            if share_features and several_processes():
                # The image ranks run the tower once here and not in their passes: so does this one, on a blank
                # crop, and tells its passes that it did (docs/distributed.md#one-vision-pass-per-forward-on-every-rank).
                vision = peft_model.get_base_model().model
                with torch.no_grad():
                    vision.blank_image_term(vision.embed_tokens.weight[:1])
                return {"image_features": []}, {"image_features": []}
            return {}, {}
        seq = batch["sequence_images"]
        if share_features:
            with torch.no_grad():
                features = peft_model.get_base_model().model.vision_embed_tokens.per_image(
                    batch["pixel_values"], batch["image_sizes"]
                )
            shared = {"image_features": features, "sequence_images": seq}
            return shared, shared
        pixels = {
            "pixel_values": batch["pixel_values"],
            "image_sizes": batch["image_sizes"],
            "sequence_images": seq,
        }
        return pixels, pixels

    def reference(self, peft_model, batch: dict, kwargs: dict) -> torch.Tensor:
        if self.reference_table is not None:
            table = self.reference_table.to(batch["input_ids"].device)[batch["indices"]]
            return torch.cat([table[:, 0], table[:, 1]])
        with torch.no_grad(), peft_model.disable_adapter():
            return pair_logps(peft_model, batch, kwargs, self.sp)[0]

    def corrupted(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Each uint8 crop with a random 80% of its 8x8-pixel cells set to white."""
        crops, _, size, _ = pixel_values.shape
        cells = -(-size // 8)
        keep = torch.rand(crops, 1, cells, cells, generator=self.generator) < 0.2
        keep = keep.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :size, :size].to(pixel_values.device)
        return torch.where(keep, pixel_values, torch.full_like(pixel_values, 255))

    def conditional_term(
        self, model, peft_model, batch: dict, policy_chosen, reference_chosen
    ) -> torch.Tensor:
        """mDPO's per-pair term on the chosen rows with corrupted images."""
        pairs = batch["input_ids"].shape[0] // 2
        chosen = {k: batch[k][:pairs] for k in ("input_ids", "attention_mask", "labels")}
        corrupted = {**batch, "pixel_values": self.corrupted(batch["pixel_values"])}
        kwargs, ref_kwargs = self.image_kwargs_for(peft_model, corrupted, self.share_features)
        kwargs = {**kwargs, "sequence_images": batch["sequence_images"][:pairs]}
        ref_kwargs = {**ref_kwargs, "sequence_images": batch["sequence_images"][:pairs]}
        policy_corrupted, _ = completion_logps(model, chosen, kwargs, self.sp)
        with torch.no_grad(), peft_model.disable_adapter():
            reference_corrupted, _ = completion_logps(peft_model, chosen, ref_kwargs, self.sp)
        margin = (policy_chosen - reference_chosen) - (policy_corrupted - reference_corrupted)
        return -F.logsigmoid(self.dpo.beta * margin)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        with splitting(self.sp):  # the frozen tower's features, computed here, have their crops sharded too
            return self.loss(model, batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        peft_model = self.accelerator.unwrap_model(model)
        policy_kwargs, reference_kwargs = self.image_kwargs_for(peft_model, batch, self.share_features)
        policy_logps, num_tokens = pair_logps(model, batch, policy_kwargs, self.sp)
        reference_logps = self.reference(peft_model, batch, reference_kwargs)
        pairs = batch["input_ids"].shape[0] // 2
        chosen, rejected = slice(0, pairs), slice(pairs, 2 * pairs)
        losses, metrics = combined_loss(
            [(loss.type, loss.weight) for loss in self.dpo.losses],
            policy_logps[chosen],
            policy_logps[rejected],
            reference_logps[chosen],
            reference_logps[rejected],
            beta=self.dpo.beta,
            label_smoothing=self.dpo.label_smoothing,
            chosen_num_tokens=num_tokens[chosen],
            rejected_num_tokens=num_tokens[rejected],
            sft_weight=self.dpo.sft_weight,
            # RPO's SFT term: the chosen completion's mean token NLL, per pair.
            chosen_nll_per_pair=sft_nll_per_pair(
                policy_logps[chosen], num_tokens[chosen], num_pairs=1, num_tokens=num_tokens[chosen]
            )
            if self.dpo.sft_weight
            else None,
        )
        if self.dpo.mdpo_weight and "pixel_values" in batch:
            conditional = self.conditional_term(
                model, peft_model, batch, policy_logps[chosen], reference_logps[chosen]
            )
            losses = losses + self.dpo.mdpo_weight * conditional
            metrics["loss/mdpo"] = conditional.detach().mean()
        metrics.update(
            reward_metrics(
                policy_logps[chosen],
                policy_logps[rejected],
                reference_logps[chosen],
                reference_logps[rejected],
                beta=self.dpo.beta,
            )
        )
        # The loop divides metric sums by the step's pairs: hand it sums, as tensors (no device sync here).
        return self.weight * losses.sum(), {k: v.detach() * pairs * self.weight for k, v in metrics.items()}


def count_pairs(batch: dict, sp: SequenceParallel | None = None) -> int:
    """The pairs of a batch; under sequence parallelism counted by the group's first rank only (DPOLoss)."""
    return batch["input_ids"].shape[0] // 2 if sp is None or sp.is_owner else 0
