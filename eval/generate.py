"""Batched greedy answers to eval prompts, sharded across ranks and returned in the examples' order on every rank.

    answers = generate_answers(model, processor, examples, batch_size=8, max_new_tokens=32, accelerator=accelerator)

- Prompts are sorted by length (text tokens + image tokens, from the image headers), longest first so that an
  out-of-memory batch shows up at once, and dealt round-robin to the ranks, so each rank's batches hold prompts of
  similar length (little left padding) and every rank gets a similar share of tokens.
- Every rank runs the same number of batches: a short shard is padded with a repeat of its last prompt, whose
  answer is dropped. ZeRO-3 needs that (each forward gathers parameters from all ranks).
- Under sharded parameters (DeepSpeed ZeRO-3, FSDP; `shards_parameters`) `generate(synced_gpus=True)` keeps a rank
  whose batch has finished stepping with the others until all have, and under FSDP2 the root unit's own parameters
  are gathered for the whole generation (`root_unit_gathered`).
- `model.generate` with left padding, greedy, the KV cache on (generate's default); it stops at the end ids of the
  model's generation config (`<|end|>`, `<|endoftext|>`). Each answer is cut at its first end id, decoded without
  special tokens and stripped.
- Phi-3 drops its cache and runs the whole sequence again (the vision path included) at the step where the batch's
  width first passes `original_max_position_embeddings` (4096: the short/long RoPE switch). Synced ranks must take
  that step together, or one rank's vision pass would wait for ranks that never run it: where a batch's prompts
  plus `max_new_tokens` can reach the switch, every rank's batch is left-padded to the widest of that batch on any
  rank (`common_width`; every rank knows every rank's prompt lengths), so all cross at the same step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from data.images import image_size, load_rgb
from data.sample import ImageRef
from eval.tasks import EvalExample
from runtime.processes import shards_parameters


def prompt_text(processor, example: EvalExample) -> str:
    return processor.apply_chat_template(list(example.messages), add_generation_prompt=True)


def _image_field(index: int) -> str:
    return f"images[{index}]"


def prompt_length(processor, example: EvalExample, text: str) -> int:
    """The prompt's token count, exactly as the processor will build it, with each image's token count taken from
    its (width, height) alone (read from the file header: no pixels are decoded here)."""
    image_token_counts = []
    for index, image in enumerate(example.images):
        width, height = (
            image.size
            if isinstance(image, Image.Image)
            else image_size(image, example.origin, _image_field(index))
        )
        image_token_counts.append(processor.num_image_tokens(width, height))
    return len(processor.encode_prompt(text, image_token_counts, where=str(example.origin)))


def shard_for_rank(lengths: Sequence[int], *, num_processes: int, process_index: int) -> list[int]:
    """The example indices rank `process_index` answers: every `num_processes`-th of the examples sorted longest
    first (ties in index order), padded with a repeat of its last index to ceil(n / num_processes) entries so that
    every rank runs the same batches. The shards together hold every index."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shard = order[process_index::num_processes] or order[-1:]  # fewer examples than ranks: repeat one
    return shard + shard[-1:] * (math.ceil(len(lengths) / num_processes) - len(shard))


def gather_object(pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Every rank's pairs, in rank order, on every rank. torch.distributed directly: accelerate's gather_object
    silently returns the local list on CPU ranks started without `--cpu` (its distributed_type is then NO)."""
    gathered: list[list[tuple[int, str]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pairs)
    return [pair for rank_pairs in gathered for pair in rank_pairs]


def merge_gathered(pairs: Iterable[tuple[int, str]], num_examples: int) -> list[str]:
    """The answers of all ranks' (index, answer) pairs in example order; a padded repeat's answer is dropped."""
    answers: dict[int, str] = {}
    for index, answer in pairs:
        answers.setdefault(index, answer)
    assert sorted(answers) == list(range(num_examples)), "the shards must cover every example exactly"
    return [answers[index] for index in range(num_examples)]


def rgb_image(image: ImageRef | Image.Image, example: EvalExample, index: int) -> Image.Image:
    """Image `index` of an example as decoded RGB pixels (an ImageRef through the safe loader)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    return load_rgb(image, example.origin, _image_field(index))


def _end_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos) if isinstance(eos, list | tuple) else {eos}


def _decode(processor, new_ids: torch.Tensor, end_ids: set[int]) -> str:
    ids = new_ids.tolist()
    stop = next((i for i, token in enumerate(ids) if token in end_ids), len(ids))
    return processor.decode(ids[:stop], skip_special_tokens=True).strip()


@contextlib.contextmanager
def root_unit_gathered(model):
    """FSDP2 gathers a unit's parameters in that unit's forward hook, and the root unit's (what no wrapped layer holds:
    the CLIP embeddings, the projector, the separators) in the root's forward. `generate` does not run the root's
    forward when the root is a PeftModel (its generate calls the base model's), so the root unit is gathered here
    for the whole generation and freed after; the layers gather theirs in their own hooks. A no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def left_pad(batch: dict, width: int, pad_token_id: int) -> dict:
    """`input_ids` and `attention_mask` left-padded to `width` (a wider batch is returned as it is)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    padded = dict(batch)
    padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (extra, 0), value=pad_token_id)
    padded["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (extra, 0), value=0)
    return padded


def common_width(
    lengths: Sequence[int],
    shards: Sequence[Sequence[int]],
    start: int,
    batch_size: int,
    max_new_tokens: int,
    switch: int | None,
) -> int | None:
    """The width every rank pads batch `start // batch_size` to: the longest prompt of that batch on any rank, where
    that prompt plus `max_new_tokens` can pass the RoPE switch; else None (each rank keeps its own width)."""
    widest = max((lengths[i] for shard in shards for i in shard[start : start + batch_size]), default=0)
    return widest if switch is not None and widest + max_new_tokens > switch else None


@torch.inference_mode()
def generate_batch(
    model,
    processor,
    examples: Sequence[EvalExample],
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    synced_gpus: bool = False,
    width: int | None = None,
) -> list[str]:
    """Greedy answers to one left-padded batch (to `width` where given). `synced_gpus`: a rank whose answers have all
    ended keeps stepping until every rank's have, so that ranks whose model is sharded (ZeRO-3, FSDP) keep making the
    same collective calls (docs/distributed.md#one-vision-pass-per-forward-on-every-rank)."""
    images = [
        [rgb_image(image, example, k) for k, image in enumerate(example.images)] for example in examples
    ]
    batch = processor(text=list(texts), images=images, padding_side="left", do_normalize=False)
    if width is not None:
        batch = left_pad(batch, width, processor.tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    # synced_gpus: transformers sets it itself for a DeepSpeed ZeRO-3 or FSDP-managed model, but not for a model
    # inside an FSDP2 root (a PeftModel's base model): passed whenever the parameters are sharded.
    extra = {"synced_gpus": True} if synced_gpus else {}
    output_ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    prompt_width = batch["input_ids"].shape[
        1
    ]  # generate returns the (left-padded) prompt, then the new tokens
    end_ids = _end_ids(model)
    return [_decode(processor, row[prompt_width:], end_ids) for row in output_ids]


def generate_indices(
    model,
    processor,
    examples: Sequence[EvalExample],
    texts: Sequence[str],
    indices: Sequence[int],
    *,
    batch_size: int,
    max_new_tokens: int,
    show_progress: bool = True,
    synced_gpus: bool = False,
    lengths: Sequence[int] = (),
    shards: Sequence[Sequence[int]] = (),
) -> list[tuple[int, str]]:
    """(index, answer) for the given examples, batched in the given order. With `synced_gpus`, `lengths` (every
    example's prompt length) and `shards` (every rank's indices) set the common width of batches that can reach the
    RoPE switch (module docstring)."""
    switch = getattr(getattr(model, "config", None), "original_max_position_embeddings", None)
    pairs: list[tuple[int, str]] = []
    with tqdm(total=len(indices), desc="eval: generating", unit="prompt", disable=not show_progress) as bar:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            width = (
                common_width(lengths, shards, start, batch_size, max_new_tokens, switch)
                if synced_gpus and shards
                else None
            )
            answers = generate_batch(
                model,
                processor,
                [examples[i] for i in chunk],
                [texts[i] for i in chunk],
                max_new_tokens=max_new_tokens,
                synced_gpus=synced_gpus,
                width=width,
            )
            pairs.extend(zip(chunk, answers))
            bar.update(len(chunk))
    return pairs


def _check_sizes(batch_size: int, max_new_tokens: int) -> None:
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_answers: {name} must be a positive int, got {value!r} (eval.{name})")


def generate_answers(
    model,
    processor,
    examples: Sequence[EvalExample],
    *,
    batch_size: int,
    max_new_tokens: int,
    accelerator=None,
) -> list[str]:
    """One stripped greedy answer per example, in the examples' order, on every rank.

    With an `accelerate.Accelerator` the examples are split across its processes and the answers gathered; every
    process must call this with the same examples. Without one, this process answers them all.
    """
    _check_sizes(batch_size, max_new_tokens)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    process_index = accelerator.process_index if accelerator is not None else 0
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    texts = [prompt_text(processor, example) for example in examples]
    lengths = [prompt_length(processor, example, text) for example, text in zip(examples, texts)]
    shards = [
        shard_for_rank(lengths, num_processes=num_processes, process_index=rank)
        for rank in range(num_processes)
    ]
    sharded = num_processes > 1 and shards_parameters(accelerator)
    with root_unit_gathered(model) if sharded else contextlib.nullcontext():
        pairs = generate_indices(
            model,
            processor,
            examples,
            texts,
            shards[process_index],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            show_progress=process_index == 0,
            synced_gpus=sharded,
            lengths=lengths,
            shards=shards,
        )
    if num_processes > 1:
        pairs = gather_object(pairs)
    return merge_gathered(pairs, len(examples))
