"""What the GRPO stage brings to the shared loop (train/core/loop.py): a loader whose micro-batches are scored rollouts,
and the loss of one such micro-batch.

Prompts are the recipe's SFT rows (`data.train`, the SFT formats, planned and image-checked as SFT plans them): each
row's turns before its last answer are the prompt, the last answer is the reference the rewards score against
(`prompt_example`: the same `EvalExample` the eval builds for the synthetic task).

`RolloutLoader(epoch)` deals the prompts as SFT does (`data.samplers.ShuffledBatchSampler`: seeded by (seed, epoch),
rank r takes the r-th micro-batch of each step), and for each optimizer step's `train.grad_accum` micro-batches:
1. samples G completions per prompt (train/rl/rollout.py; completion k of planned prompt i in epoch e is seeded by
   (seed, e, i, k), so a resume or another rank count draws the same completions);
2. scores them (train/rl/rewards.py), and turns the weighted reward sum into group advantages
   (train/rl/losses.py; `scale_rewards: batch` takes the std over the step's completions on all ranks, TRL's
   generation batch);
3. with `beta > 0` computes the reference log-probs (adapter disabled), with `num_iterations > 1` the sampling
   policy's log-probs (TRL's `old_per_token_logps`), both once per generation;
4. yields the step's micro-batches `num_iterations` times over: TRL's `num_iterations` optimisation passes per
   generation, `steps_per_generation = grad_accum`.

A micro-batch is laid out as an SFT batch whose supervised tokens are the completions: `input_ids` = left-padded
prompt, then the right-padded completion (TRL's layout), `labels` = the completion tokens (-100 elsewhere), so the
loop's token counts and the supervised-position logits of train/core/losses.py apply as they are.

`GRPOLoss` computes the completion tokens' log-probs at the sampling temperature (logits / temperature, as TRL),
the clipped per-token loss and the loop's per-completion terms. The language model reads each prompt once for its G
completions (`grpo.share_prompt`: train/rl/shared_layout.py's layout, the same log-probs as the G-row layout). Image
features: with a frozen tower and projector (and outside FSDP) the features the rollout computed are reused (no
vision pass in the loss pass); otherwise each prompt's images are encoded once per pass and shared over its
completions (`sequence_images`).

Resume: the loop state counts micro-batches; a resume that lands inside a generation's `num_iterations` passes
samples that generation again with the resumed weights (the same seeds), so it is exact only at generation
boundaries: with `num_iterations > 1` keep `train.checkpoint_every` a multiple of it (config/checks.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from data.render import IGNORE_INDEX, to_messages
from data.sample import DataError, SFTSample
from data.samplers import ShuffledBatchSampler
from eval.tasks import EvalExample
from train.core.losses import (
    attn_implementation,
    prefix_sharing_mask,
    supervised_positions,
    token_logps,
    unwrapped,
)
from train.core.trainable import dpo_parts
from train.rl.losses import clip_metrics, completion_terms, group_advantages, per_token_loss, units
from train.rl.rewards import Reward, score_completions
from train.rl.rollout import Completions, RolloutEngine, without_image_slots
from train.rl.shared_layout import shared_layout

log = logging.getLogger(__name__)


def grpo_parts(model_section):
    """A fresh LoRA on the merged start, as DPO trains (the tower gets LoRA when the recipe puts it there, the
    projector stays frozen: then each prompt's image features serve all the loss passes of its completions); or the
    recipe's parts when it trains the language model in full (only with grpo.beta 0, config/checks.py: a KL
    reference is the adapter switched off)."""
    if model_section.language == "full":
        return model_section
    return dpo_parts(model_section)


def prompt_example(sample: SFTSample, index: int, suffix: str | None = None) -> EvalExample:
    """An SFT sample as a GRPO prompt: the turns before its last answer (`suffix` appended to the last user turn's
    text: grpo.prompt_suffix), that answer as the reference."""
    *prompt, answer = sample.turns
    if answer.role != "assistant" or answer.num_images or not prompt or prompt[-1].role != "user":
        raise DataError(
            sample.origin,
            "messages",
            "a GRPO prompt row must end with a user turn and a text-only "
            "assistant answer (the reference the rewards score against)",
        )
    messages = to_messages(prompt)
    if suffix:
        messages[-1] = {
            **messages[-1],
            "content": [*messages[-1]["content"], {"type": "text", "text": suffix}],
        }
    return EvalExample(
        id=str(index),
        messages=tuple(messages),
        images=sample.images,
        references=(answer.text,),
        meta={},
        origin=sample.origin,
    )


def completion_seeds(seed: int, epoch: int, indices: Sequence[int], num_generations: int) -> list[int]:
    """One 63-bit seed per completion, a function of (seed, epoch, planned index, k) only."""
    return [
        int(np.random.SeedSequence([seed, epoch, int(i), k]).generate_state(2, np.uint64)[0] >> np.uint64(1))
        for i in indices
        for k in range(num_generations)
    ]


def _gather(values: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-length 1-D tensor, concatenated in rank order (this rank's alone without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values.contiguous())
    return torch.cat(gathered)


def rollout_batch(completions: Completions, pad_token_id: int | None = None) -> dict:
    """The micro-batch tensors of `completions` (module doc's layout); with `pad_token_id`, also the prefix-sharing
    layout of train/rl/shared_layout.py (`shared_*`)."""
    group = completions.num_generations
    prompt_ids = completions.prompt_ids.repeat_interleave(group, dim=0)
    prompt_mask = completions.prompt_mask.repeat_interleave(group, dim=0)
    input_ids = torch.cat([prompt_ids, completions.completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completions.completion_mask], dim=1)
    labels = torch.cat(
        [
            torch.full_like(prompt_ids, IGNORE_INDEX),
            completions.completion_ids.masked_fill(completions.completion_mask == 0, IGNORE_INDEX),
        ],
        dim=1,
    )
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_mask": completions.completion_mask,
        "sequence_images": completions.row_images(),
    }
    if completions.pixel_values is not None:
        batch["pixel_values"], batch["image_sizes"] = completions.pixel_values, completions.image_sizes
    if completions.image_features is not None:
        batch["image_features"] = completions.image_features
    if pad_token_id is not None:
        batch.update(
            shared_layout(
                completions.prompt_ids,
                completions.prompt_mask,
                completions.completion_ids,
                completions.completion_mask,
                pad_token_id,
            )
        )
        batch["prompt_images"] = completions.prompt_images
    return batch


def image_kwargs(batch: dict, shared: bool = False) -> dict:
    """The loss pass's image inputs: the rollout's features when reusable, else the prompts' pixels (encoded once
    per prompt, shared over its G rows, or its one row in the shared layout); none for a text-only micro-batch."""
    rows = batch["prompt_images"] if shared else batch["sequence_images"]
    if "image_features" in batch:
        return {"image_features": batch["image_features"], "sequence_images": rows}
    if "pixel_values" in batch:
        return {
            "pixel_values": batch["pixel_values"],
            "image_sizes": batch["image_sizes"],
            "sequence_images": rows,
        }
    return {}


def shares_prompt(model, batch: dict) -> bool:
    """Whether the loss pass runs the prefix-sharing layout: built for this batch, and an attention that takes a
    block mask (sdpa, eager; flash-attention-2 does not)."""
    return "shared_input_ids" in batch and attn_implementation(model) in ("sdpa", "eager")


def completion_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (tokens, V) for each completion token, row-major over the completion mask; those tokens), from the
    prefix-sharing layout where `shares_prompt`, else from the G-row layout (the same values)."""
    if shares_prompt(model, batch):
        dtype = unwrapped(model).get_input_embeddings().weight.dtype
        mask = prefix_sharing_mask(batch["shared_segments"], attn_implementation(model), dtype)
        logits = model(
            input_ids=batch["shared_input_ids"],
            attention_mask=mask,
            position_ids=batch["shared_position_ids"],
            logits_to_keep=batch["shared_keep"],
            use_cache=False,
            **image_kwargs(batch, shared=True),
        ).logits
        targets = batch["input_ids"][:, -batch["completion_mask"].shape[1] :][batch["completion_mask"].bool()]
        return logits[batch["shared_token_index"]], targets
    keep, targets = supervised_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
        **image_kwargs(batch),
    ).logits
    return logits, targets


def completion_token_logps(model, batch: dict, temperature: float, *, entropy: bool = False):
    """(log-probs (N, C) of the completion tokens at `temperature`, 0 on padding; the mean token entropy or None).
    Logits only at the positions whose next token is a completion token."""
    logits, targets = completion_logits(model, batch)  # (tokens, V)
    image_token_id = unwrapped(model).config.image_token_id
    logits = without_image_slots(logits, image_token_id) / temperature
    mask = batch["completion_mask"].bool()
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logps = logps.masked_scatter(mask, token_logps(logits, targets))
    mean_entropy = None
    if entropy:
        with torch.no_grad():
            log_probs = logits.log_softmax(-1)
            probs = log_probs.exp()  # 0 at the masked image slot, whose log-prob is -inf: that term is 0
            mean_entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1).mean()
    return logps, mean_entropy


class RolloutLoader:
    """The micro-batches of one epoch for this rank: scored rollouts (module doc). `skip_first_batches(n)` (what
    the loop calls on resume) continues after the epoch's first n micro-batches."""

    def __init__(self, owner: GRPOData, epoch: int, skip: int = 0):
        self.owner, self.epoch, self.skip = owner, epoch, skip

    def skip_first_batches(self, count: int) -> RolloutLoader:
        return RolloutLoader(self.owner, self.epoch, self.skip + count)

    def __iter__(self) -> Iterator[dict]:
        owner = self.owner
        owner.sampler.set_epoch(self.epoch)
        prompt_batches = list(owner.sampler)
        per_cycle = owner.grad_accum
        cycles = len(prompt_batches) // per_cycle
        passes = owner.grpo.num_iterations
        position = 0
        for cycle in range(cycles):
            length = per_cycle * passes
            if position + length <= self.skip:
                position += length
                continue
            if self.skip > position:  # only with num_iterations > 1: the loop resumes at step boundaries
                log.warning(
                    "resuming inside generation %d of epoch %d: its completions are sampled again with the "
                    "current weights, so this resume is not exact (keep train.checkpoint_every a multiple "
                    "of grpo.num_iterations)",
                    cycle,
                    self.epoch,
                )
            batches = owner.generate(prompt_batches[cycle * per_cycle : (cycle + 1) * per_cycle], self.epoch)
            for _ in range(passes):
                for batch in batches:
                    if position >= self.skip:
                        yield batch
                    position += 1


class GRPOData:
    """Prompts, sampler and rollout engine of the stage; `make_loader(epoch)` is what the trainer takes."""

    def __init__(
        self,
        recipe,
        planned,
        processor,
        engine: RolloutEngine,
        rewards: Sequence[Reward],
        model,
        *,
        num_replicas: int,
        rank: int,
        reference: bool,
    ):
        self.recipe, self.grpo, self.processor, self.engine = recipe, recipe.grpo, processor, engine
        self.rewards, self.model, self.reference = list(rewards), model, reference
        self.examples = [
            prompt_example(plan.sample, index, self.grpo.prompt_suffix) for index, plan in enumerate(planned)
        ]
        self.grad_accum = recipe.train.grad_accum
        self.sampler = ShuffledBatchSampler(
            len(planned), recipe.train.micro_batch_size, recipe.seed, num_replicas=num_replicas, rank=rank
        )
        pattern = self.grpo.answer_pattern
        self.answer_pattern = re.compile(pattern, re.DOTALL) if pattern else None
        self.last_batches: list[dict] = []  # the last generation's scored rollouts, for the summary's samples

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch, as the loop counts them (each generation replayed num_iterations times)."""
        whole = len(self.sampler) // self.grad_accum * self.grad_accum
        return whole * self.grpo.num_iterations

    def make_loader(self, epoch: int) -> RolloutLoader:
        return RolloutLoader(self, epoch)

    def generate(self, prompt_batches: list[list[int]], epoch: int) -> list[dict]:
        """The scored rollouts of one optimizer step's micro-batches."""
        grpo, model = self.grpo, self.model
        was_training = model.training
        model.eval()
        try:
            rolled = []
            for indices in prompt_batches:
                examples = [self.examples[i] for i in indices]
                seeds = completion_seeds(self.recipe.seed, epoch, indices, grpo.num_generations)
                rolled.append(
                    (
                        indices,
                        examples,
                        self.engine.sample(
                            model, examples, num_generations=grpo.num_generations, seeds=seeds
                        ),
                    )
                )
            batches = [
                self._scored(indices, examples, completions) for indices, examples, completions in rolled
            ]
            self._advantages(batches)
            for batch in batches:
                self._extra_logps(batch)
            self.last_batches = batches
        finally:
            model.train(was_training)
        return batches

    def _scored(self, indices, examples, completions: Completions) -> dict:
        group = self.grpo.num_generations
        row_examples = [example for example in examples for _ in range(group)]
        table = score_completions(
            self.rewards,
            completions.texts,
            row_examples,
            completions.completion_mask.sum(1).tolist(),
            max_new_tokens=self.grpo.max_new_tokens,
            answer_pattern=self.answer_pattern,
        )
        per_function = torch.tensor(table, dtype=torch.float32).reshape(len(row_examples), len(self.rewards))
        weights = torch.tensor([reward.weight for reward in self.rewards], dtype=torch.float32)
        batch = rollout_batch(
            completions, self.processor.tokenizer.pad_token_id if self.grpo.share_prompt else None
        )
        batch["rewards_per_function"] = per_function
        batch["rewards"] = (per_function * weights).nansum(dim=1)
        batch["indices"] = torch.tensor(indices, dtype=torch.long)
        batch["texts"] = completions.texts
        batch["examples"] = examples
        batch["truncated"] = completions.truncated
        return batch

    def _advantages(self, batches: list[dict]) -> None:
        """Group advantages of each micro-batch; with `scale_rewards: batch` over the rewards of the whole step on
        all ranks (TRL's generation batch), every group's mean still its own."""
        group, scale = self.grpo.num_generations, self.grpo.scale_rewards
        rewards = torch.cat([b["rewards"] for b in batches])
        if scale == "batch":
            rewards = _gather(rewards.to(self.model.device)).cpu()
        advantages, std = group_advantages(rewards, group, scale)
        start = self.rank_offset(len(batches[0]["rewards"]) * len(batches)) if scale == "batch" else 0
        _, group_std = group_advantages(
            rewards, group, "group"
        )  # for the zero-std share, whatever the scaling
        for batch in batches:
            rows = slice(start, start + len(batch["rewards"]))
            batch["advantages"] = advantages[rows]
            batch["zero_std_groups"] = (
                torch.isclose(group_std[rows], torch.zeros_like(group_std[rows])).float().mean()
            )
            start += len(batch["rewards"])

    def rank_offset(self, per_rank: int) -> int:
        """Where this rank's rewards start among every rank's (gathered in rank order)."""
        return (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0) * per_rank

    @torch.no_grad()
    def _extra_logps(self, batch: dict) -> None:
        """The sampling policy's log-probs (num_iterations > 1) and the reference's (beta > 0), once per generation."""
        on_device = {
            k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
        if self.grpo.num_iterations > 1:
            batch["old_logps"] = completion_token_logps(self.model, on_device, self.grpo.temperature)[0]
        if self.reference:
            with self.model.disable_adapter():
                batch["ref_logps"] = completion_token_logps(self.model, on_device, self.grpo.temperature)[0]


class GRPOLoss:
    """The loop's `loss_sum` and `count` for rollout micro-batches (module doc)."""

    def __init__(self, grpo, reward_names: Sequence[str]):
        self.grpo, self.reward_names = grpo, list(reward_names)
        self.epsilon_low = grpo.epsilon
        self.epsilon_high = grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high

    def count(self, batch: dict) -> int:
        return units(batch["completion_mask"], self.grpo.loss_type)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        grpo = self.grpo
        logps, entropy = completion_token_logps(model, batch, grpo.temperature, entropy=True)
        mask = batch["completion_mask"]
        advantages = batch["advantages"].to(logps.device)
        loss_NT, extra = per_token_loss(
            logps,
            batch.get("old_logps"),
            batch.get("ref_logps"),
            advantages,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=grpo.beta,
        )
        terms = completion_terms(loss_NT, mask, grpo.loss_type, max_completion_length=grpo.max_new_tokens)
        metrics = {
            **clip_metrics(
                extra["ratio"], advantages, mask, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high
            ),
            "entropy": entropy,
        }
        tokens = mask.sum().clamp(min=1)
        if "kl" in extra:
            metrics["kl"] = (extra["kl"] * mask).sum() / tokens
        per_function = batch["rewards_per_function"]
        rewards = batch["rewards"]
        metrics["reward"] = rewards.mean()
        metrics["reward_std"] = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        for column, name in enumerate(self.reward_names):
            values = per_function[:, column]
            values = values[~values.isnan()]
            metrics[f"rewards/{name}/mean"] = values.mean() if values.numel() else torch.zeros(())
            metrics[f"rewards/{name}/std"] = values.std() if values.numel() > 1 else torch.zeros(())
        metrics["completions/mean_length"] = mask.sum(1).float().mean()
        metrics["completions/truncated_ratio"] = batch["truncated"].float().mean()
        metrics["frac_reward_zero_std"] = batch["zero_std_groups"]
        # The loop divides metric sums by the step's units: hand it each micro-batch mean times its units.
        scale = float(self.count(batch))
        return terms.sum(), {k: torch.as_tensor(v).detach().float().cpu() * scale for k, v in metrics.items()}
