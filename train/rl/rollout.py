"""GRPO's rollouts: G sampled completions per prompt, from the training model, one vision pass and one prompt pass
per prompt group.

    engine = TorchRollout(processor, temperature=1.0, top_p=1.0, max_new_tokens=16, stop_strings=(), synced=False)
    completions = engine.sample(model, examples, num_generations=8, seeds=[...])

`RolloutEngine` is the interface the GRPO stage calls (docs/grpo.md describes how another engine, e.g. vLLM serving
merged weights, would plug in): prompts in, `Completions` out (token ids, masks, texts, and what the loss pass needs
to see the prompt's images again).

`TorchRollout` samples with the training model itself:
- **One vision pass per prompt.** The B prompts of a micro-batch go through the processor once; their images are
  encoded once (`vision_embed_tokens.per_image`) and the features are written into the prompt embeddings of the
  prefill; with a frozen tower and projector they are returned in `Completions.image_features` and reused by every
  loss pass over the G completions (no vision pass in training at all).
- **One prompt pass per group.** The B left-padded prompts are prefilled once with the KV cache on; the cache is then
  repeated G times along the batch (`Cache.batch_repeat_interleave`) and the B x G completions are decoded from it,
  one token per step for all rows.
- **Sampling.** logits / temperature, nucleus (top-p) filtering, then one draw per row from that row's own
  `torch.Generator`, seeded by the caller per (prompt, completion): a completion depends only on its seed and the
  weights, not on the batch it was drawn in or the rank that drew it (2 processes sample what 1 does, and a resume
  samples again what was sampled).
- **Stops.** A row ends at an end id of the model's generation config (`<|end|>`, `<|endoftext|>`), at a stop string
  (the token that completes it is the last one), or after `max_new_tokens`. The completion mask covers the tokens up
  to and including the last one (TRL's convention). Under sharded parameters (`synced`) every rank keeps stepping
  until all ranks' rows have ended (each forward gathers parameters with collectives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from eval.generate import prompt_text, rgb_image, root_unit_gathered
from eval.tasks import EvalExample


@dataclass
class Completions:
    """The B x G completions of B prompts, row i = completion i % G of prompt i // G."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (N, C) right-padded
    completion_mask: torch.Tensor  # (N, C): 1 on the completion's tokens, its last (end) token included
    texts: list[str]  # (N,) decoded, cut before an end id; a stop string is kept
    pixel_values: torch.Tensor | None  # the B prompts' crops, once each
    image_sizes: torch.Tensor | None
    prompt_images: list[list[int]]  # prompt b's images: indices into image_sizes
    image_features: list[torch.Tensor] | None  # one per image, when the features can be reused (frozen tower)
    truncated: torch.Tensor  # (N,) bool: ended by max_new_tokens, not by an end id or a stop string

    @property
    def num_generations(self) -> int:
        return self.completion_ids.shape[0] // self.prompt_ids.shape[0]

    def row_images(self) -> list[list[int]]:
        """`sequence_images` for the N rows: each completion sees its prompt's images (the same features)."""
        return [images for images in self.prompt_images for _ in range(self.num_generations)]


class RolloutEngine(Protocol):
    def sample(
        self, model, examples: Sequence[EvalExample], *, num_generations: int, seeds: Sequence[int]
    ) -> Completions:
        """G completions of each example; `seeds[i]` seeds completion i % G of example i // G."""


def without_image_slots(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The logits with the `<|image|>` id made impossible: a completion never holds an image slot (it would have no
    image to fill it). The loss scores completions under the same masked distribution they were sampled from."""
    return logits.float().index_fill(-1, torch.tensor([image_token_id], device=logits.device), float("-inf"))


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities (N, V) in float32: softmax(logits / temperature), keeping the smallest set of tokens
    whose probability reaches top_p (at least the most likely one), renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability mass strictly ahead of each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _stop_hit(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> bool:
    if not stop_strings:
        return False
    tail = tokenizer.decode(ids[-16:], skip_special_tokens=False)  # a stop string ends within the last tokens
    return any(stop in tail for stop in stop_strings)


class TorchRollout:
    """`RolloutEngine` on the training model (module doc)."""

    def __init__(
        self,
        processor,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop_strings: Sequence[str] = (),
        synced: bool = False,
        share_features: bool = True,
    ):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_strings, self.synced, self.share_features = tuple(stop_strings), synced, share_features

    def prompts(self, examples: Sequence[EvalExample], device) -> dict:
        """The processor's batch for the prompts (left-padded; uint8 crops, normalised on the device)."""
        texts = [prompt_text(self.processor, example) for example in examples]
        images = [
            [rgb_image(image, example, k) for k, image in enumerate(example.images)] for example in examples
        ]
        batch = self.processor(text=texts, images=images, padding_side="left", do_normalize=False)
        return {key: value.to(device) for key, value in batch.items()}

    def _any_running(self, running: torch.Tensor) -> bool:
        flag = running.any().to(torch.float32).reshape(1)
        if self.synced:
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)

    @torch.no_grad()
    def sample(
        self, model, examples: Sequence[EvalExample], *, num_generations: int, seeds: Sequence[int]
    ) -> Completions:
        group = num_generations
        device = next(model.parameters()).device
        batch = self.prompts(examples, device)
        prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        counts = [len(example.images) for example in examples]
        starts = [sum(counts[:b]) for b in range(len(counts))]
        prompt_images = [list(range(start, start + count)) for start, count in zip(starts, counts)]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        image_token_id = base.config.image_token_id
        end_ids = model.generation_config.eos_token_id
        end_ids = torch.tensor(end_ids if isinstance(end_ids, list | tuple) else [end_ids], device=device)
        with root_unit_gathered(model) if self.synced else contextlib.nullcontext():
            features, image_kwargs = self._prefill_images(base, batch, prompt_images)
            out = model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **image_kwargs,
            )
            cache = out.cache
            cache.batch_repeat_interleave(group)  # the prompt's keys and values, shared by its G completions
            logits = out.logits[:, -1].repeat_interleave(group, dim=0)
            mask = prompt_mask.repeat_interleave(group, dim=0)
            position = positions[:, -1:].repeat_interleave(group, dim=0)
            rows = logits.shape[0]
            generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
            if len(generators) != rows:
                raise ValueError(f"grpo rollout: {len(seeds)} seeds for {rows} completions")
            pad = self.tokenizer.pad_token_id
            running = torch.ones(rows, dtype=torch.bool, device=device)
            truncated = torch.zeros(rows, dtype=torch.bool, device=device)
            tokens: list[torch.Tensor] = []
            taken: list[torch.Tensor] = []
            history: list[list[int]] = [[] for _ in range(rows)]
            for step in range(self.max_new_tokens):
                probs = nucleus_probs(
                    without_image_slots(logits, image_token_id), self.temperature, self.top_p
                )
                drawn = torch.cat(
                    [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(rows)]
                )
                drawn = torch.where(running, drawn, torch.full_like(drawn, pad))
                tokens.append(drawn)
                taken.append(running.clone())
                ended = torch.isin(drawn, end_ids)
                if self.stop_strings:
                    for i in running.nonzero().flatten().tolist():
                        history[i].append(int(drawn[i]))
                        if _stop_hit(self.tokenizer, history[i], self.stop_strings):
                            ended[i] = True
                running = running & ~ended
                if step == self.max_new_tokens - 1:
                    truncated = running.clone()
                if not self._any_running(running):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = model(
                    input_ids=drawn[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    cache=cache,
                    use_cache=True,
                )
                cache = out.cache
                logits = out.logits[:, -1]
        completion_ids = torch.stack(tokens, dim=1)
        completion_mask = torch.stack(taken, dim=1).long()
        ends = set(end_ids.tolist())
        texts = [self.decode(ids, row_mask, ends) for ids, row_mask in zip(completion_ids, completion_mask)]
        return Completions(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            texts=texts,
            pixel_values=batch.get("pixel_values"),
            image_sizes=batch.get("image_sizes"),
            prompt_images=prompt_images,
            image_features=features,
            truncated=truncated,
        )

    def _prefill_images(self, base, batch: dict, prompt_images: list[list[int]]) -> tuple[list | None, dict]:
        """(features kept for the loss passes, the prefill's image inputs). Sharing: each image encoded here, once,
        and its features kept; a text-only micro-batch keeps `[]` ("no image, the vision path is done"), so that its
        loss passes run no tower either (every rank then runs the same modules under ZeRO-3). Not sharing (FSDP, a
        tower with LoRA): the prefill's forward encodes each prompt's images once itself."""
        if not self.share_features:
            if "pixel_values" not in batch:
                return None, {}
            return None, {
                "pixel_values": batch["pixel_values"],
                "image_sizes": batch["image_sizes"],
                "sequence_images": prompt_images,
            }
        if "pixel_values" not in batch:
            return [], {}
        features = base.model.vision_embed_tokens.per_image(batch["pixel_values"], batch["image_sizes"])
        return features, {"image_features": features, "sequence_images": prompt_images}

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, end_ids: set[int]) -> str:
        """A completion's text: its tokens before the first end id, special tokens dropped, stripped."""
        kept = ids[mask.bool()].tolist()
        stop = next((i for i, token in enumerate(kept) if token in end_ids), len(kept))
        return self.tokenizer.decode(kept[:stop], skip_special_tokens=True).strip()
