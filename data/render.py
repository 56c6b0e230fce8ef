"""Canonical samples -> token ids and labels, built together from explicit turn spans.

    rendered = render_sft(sample, processor, image_token_counts=[2509])
    rendered.input_ids   # == processor(text=processor.apply_chat_template(messages), images=...)["input_ids"][0]
    rendered.labels      # -100 everywhere except each assistant turn's content and its closing <|end|>

**Ids.** A sample's turns are turned back into the chat-template message form (an `ImagePart` becomes the
`<|image_k|>\\n` that `Phi3VProcessor.apply_chat_template` writes), the hub template renders them, and
`Phi3VProcessor.encode_prompt` tokenises the result exactly as the processor does: chunk-wise between image tags,
each chunk with its own `<s>`, image k as `image_token_counts[k]` copies of the `<|image|>` id. The ids are therefore
the processor's ids by construction, not a re-implementation of them.

**Labels by prefix tokenisation.** For assistant turn k, the ids of (turns before k + the generation prompt) and
the ids of (turns up to and including k) are both checked to be prefixes of the full ids; the supervised span is
what lies between them up to and including the turn's closing `<|end|>`. This is exact whatever the tokenizer does
at the seams (`<|assistant|>` is rstrip and swallows the `\\n` and any leading whitespace of the answer; every text
segment between special tokens gets its own `▁`), because both ends of every span are measured with the real
tokenizer rather than predicted. Not supervised (-100): BOS, system and user turns, the `<|assistant|>` tag, the
`▁ \\n` tokens after `<|end|>`, image slots (images may only appear in system and user turns).

**No `<|endoftext|>` after the last turn.** Decision and evidence:

- The hub chat template of both Phi-3-vision-128k-instruct and Phi-3.5-vision-instruct closes every turn with
  `<|end|>\\n` and never writes `<|endoftext|>` (docs/phi3v.md#tokenizer-ids-and-chat-template), so without it a training sequence is exactly the
  text the template (and every serving stack that applies it) produces at inference, for the last turn as for the
  earlier ones.
- The model ends its turns with `<|end|>` (32007): our `Phi3VForCausalLM` generates with
  `eos_token_id=[<|end|>, <|endoftext|>]`, and onnxruntime-genai switched the Phi-3-V EOS to 32007 for that reason
  (docs/phi3v.md#tokenizer-ids-and-chat-template). Generation never reaches a token after `<|end|>`, so nothing there needs training.
- The official Phi-3CookBook recipe appends `<|end|>\\n<|endoftext|>` and supervises it; its eval calls
  `generate(eos_token_id=processor.tokenizer.eos_token_id)`, i.e. it stops on 32000 only, which is why it must teach
  the model to emit 32000 (docs/phi3v.md#training-sequence-end). 2U1/Phi3-Vision-Finetune appends a bare 32000 (no newline) with its
  label, a layout the template never produces. Both supervise the last turn differently from the earlier turns of
  the same conversation.
- Consequence: a tuned model is to be run with `<|end|>` among its stop tokens (our generation config, vLLM and
  the model card's chat template all end turns there). Generating with `eos_token_id=32000` alone, as the Cookbook
  eval does, may run past `<|end|>`.

**Preference pairs** (`render_preference`) share the prompt ids (the template with the generation prompt); each
completion is the answer, `<|end|>` and the template's trailing newline tokens, labelled on the answer and `<|end|>`,
so `prompt + completion` equals the full render of the conversation ending in that answer. An image-contrast pair
(`rejected_images` set) renders the rejected prompt with its own image token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from data.conversation import check_completion, validate_conversation
from data.sample import DataError, ImagePart, Origin, PreferenceSample, SFTSample, TextPart, Turn
from models.phi3v.configuration import IMAGE_TOKEN
from models.phi3v.processing import IMAGE_TAG, Phi3VProcessor

IGNORE_INDEX = -100
"""The label of a token that is not predicted (PyTorch cross-entropy's default ignore_index)."""

AssistantTurns = Literal["all", "last"]


@dataclass(frozen=True, kw_only=True)
class Rendered:
    """One SFT sample as the model reads it: `input_ids` and `labels` have the same length."""

    input_ids: list[int]
    labels: list[int]
    """`IGNORE_INDEX` where the token is not supervised, else the token id itself (unshifted, HF convention)."""
    image_token_counts: tuple[int, ...]
    """Image slots of each image, in order; image k fills the k-th run of `<|image|>` ids."""

    @property
    def num_images(self) -> int:
        return len(self.image_token_counts)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True, kw_only=True)
class RenderedPair:
    """One preference pair: a chosen and a rejected completion of the same prompt.

    The chosen sequence is `prompt_ids + chosen_ids`; the rejected one is `rejected_prompt_ids + rejected_ids`, where
    `rejected_prompt_ids` equals `prompt_ids` unless the pair has its own rejected images (image-contrast pairs).
    Prompt tokens are never supervised; `*_labels` cover the completion ids only.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_prompt_ids: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    image_token_counts: tuple[int, ...]
    rejected_image_token_counts: tuple[int, ...]
    """Equal to `image_token_counts` unless the sample has `rejected_images`."""
    has_rejected_images: bool

    @property
    def num_images(self) -> int:
        return len(self.image_token_counts)

    def chosen_sequence(self) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of prompt + chosen completion; labels are -100 over the prompt."""
        return self.prompt_ids + self.chosen_ids, [IGNORE_INDEX] * len(self.prompt_ids) + self.chosen_labels

    def rejected_sequence(self) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the rejected prompt + rejected completion."""
        prompt = self.rejected_prompt_ids
        return prompt + self.rejected_ids, [IGNORE_INDEX] * len(prompt) + self.rejected_labels

    @property
    def num_tokens(self) -> int:
        """The longer of the two sequences: what a padded DPO batch must hold."""
        return max(
            len(self.prompt_ids) + len(self.chosen_ids),
            len(self.rejected_prompt_ids) + len(self.rejected_ids),
        )

    @property
    def shared_tokens(self) -> int:
        """The prefix-sharing row's length, prompt + chosen + rejected (data.collate.DPOCollator's layout); a pair
        with its own rejected images takes the 2-row layout: twice `num_tokens`."""
        if self.has_rejected_images:
            return 2 * self.num_tokens
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


# ------------------------------------------------------------------------------------------------ validation


def _check_counts(
    image_token_counts: Sequence[int], num_images: int, origin: Origin, what: str
) -> tuple[int, ...]:
    counts = tuple(int(count) for count in image_token_counts)
    if len(counts) != num_images:
        raise ValueError(
            f"{origin}: {len(counts)} {what} given for {num_images} image(s); pass one count per image, from "
            "processor.num_image_tokens(width, height)"
        )
    if any(count < 1 for count in counts):
        raise ValueError(f"{origin}: {what} must be positive, got {list(counts)}")
    return counts


def check_sft(sample: SFTSample) -> None:
    validate_conversation(
        sample.turns,
        num_images=len(sample.images),
        images_field="images",
        origin=sample.origin,
        field="turns",
    )


def check_preference(sample: PreferenceSample) -> None:
    origin = sample.origin
    validate_conversation(
        sample.prompt,
        num_images=len(sample.images),
        images_field="images",
        origin=origin,
        field="prompt",
        final_role="user",
    )
    num_prompt_images = sum(turn.num_images for turn in sample.prompt)
    if sample.rejected_images is not None and len(sample.rejected_images) != num_prompt_images:
        raise DataError(
            origin,
            "rejected_images",
            f"image count mismatch: the prompt has {num_prompt_images} image "
            f"part(s) but 'rejected_images' has {len(sample.rejected_images)} image(s). Fix: give the "
            "rejected prompt one image per image part",
        )
    for field in ("chosen", "rejected"):
        check_completion(getattr(sample, field), origin, field)


# ------------------------------------------------------------------------------------------------ rendering


def to_messages(turns: Sequence[Turn]) -> list[dict]:
    """Canonical turns -> the message form `Phi3VProcessor.apply_chat_template` reads (parts in order)."""
    return [
        {
            "role": turn.role,
            "content": [
                {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
                for part in turn.parts
            ],
        }
        for turn in turns
    ]


def encode_turns(
    processor: Phi3VProcessor,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int],
    *,
    add_generation_prompt: bool = False,
    where: str = "conversation",
) -> list[int]:
    """The processor's ids for these turns; `image_token_counts` covers at least the images in them, in order."""
    text = processor.apply_chat_template(to_messages(turns), add_generation_prompt=add_generation_prompt)
    num_images = sum(turn.num_images for turn in turns)
    return processor.encode_prompt(text, image_token_counts[:num_images], where=where)


def _require_prefix(prefix: list[int], ids: list[int], origin: Origin, field: str, what: str) -> None:
    if ids[: len(prefix)] != prefix:
        raise DataError(
            origin,
            field,
            f"tokenizer seam: the ids of {what} are not a prefix of the full "
            "conversation's ids, so the label span cannot be placed exactly; this tokenizer merges "
            "tokens across chat-template boundaries. Fix: report it with this row",
        )


def _supervised_length(completion_ids: list[int], end_token_id: int, origin: Origin, field: str) -> int:
    """How many leading completion tokens are supervised: up to and including the closing `<|end|>`."""
    ends = [i for i, token in enumerate(completion_ids) if token == end_token_id]
    if not ends:
        raise ValueError(
            f"{origin}, field '{field}': the chat template did not close the turn with <|end|> "
            f"(id {end_token_id}); labels need the turn's end token"
        )
    return ends[-1] + 1


def completion(
    processor: Phi3VProcessor,
    prompt: Sequence[Turn],
    answer: Turn,
    image_token_counts: Sequence[int],
    prompt_ids: list[int],
    origin: Origin,
    field: str,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one assistant turn after `prompt`, whose ids with the generation prompt are `prompt_ids`.

    ids = the tokens the full render adds after `prompt_ids`: answer, `<|end|>`, the template's trailing newline
    tokens; labels cover the answer and `<|end|>`.
    """
    full_ids = encode_turns(processor, [*prompt, answer], image_token_counts, where=f"{origin} {field}")
    _require_prefix(prompt_ids, full_ids, origin, field, "the prompt with the generation prompt")
    ids = full_ids[len(prompt_ids) :]
    end_token_id = processor.end_token_ids[0]
    supervised = _supervised_length(ids, end_token_id, origin, field)
    return ids, ids[:supervised] + [IGNORE_INDEX] * (len(ids) - supervised)


def supervised_turns(turns: Sequence[Turn], assistant_turns: AssistantTurns) -> list[int]:
    """Indices of the assistant turns whose answers are supervised."""
    if assistant_turns not in ("all", "last"):
        raise ValueError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
    indices = [i for i, turn in enumerate(turns) if turn.role == "assistant"]
    return indices if assistant_turns == "all" else indices[-1:]


def render_sft(
    sample: SFTSample,
    processor: Phi3VProcessor,
    image_token_counts: Sequence[int],
    *,
    assistant_turns: AssistantTurns = "all",
) -> Rendered:
    """The sample's ids (the processor's, exactly) and labels on the chosen assistant turns (see module docstring)."""
    check_sft(sample)
    counts = _check_counts(image_token_counts, len(sample.images), sample.origin, "image_token_counts")
    turns, origin = sample.turns, sample.origin
    input_ids = encode_turns(processor, turns, counts, where=str(origin))
    labels = [IGNORE_INDEX] * len(input_ids)
    for k in supervised_turns(turns, assistant_turns):
        prompt_ids = encode_turns(processor, turns[:k], counts, add_generation_prompt=True, where=str(origin))
        _require_prefix(prompt_ids, input_ids, origin, "turns", f"turns[:{k}] with the generation prompt")
        span_ids, span_labels = completion(
            processor, turns[:k], turns[k], counts, prompt_ids, origin, f"turns[{k}]"
        )
        _require_prefix(prompt_ids + span_ids, input_ids, origin, "turns", f"turns[:{k + 1}]")
        labels[len(prompt_ids) : len(prompt_ids) + len(span_ids)] = span_labels
    return Rendered(input_ids=input_ids, labels=labels, image_token_counts=counts)


def sft_length(sample: SFTSample, processor: Phi3VProcessor, image_token_counts: Sequence[int]) -> int:
    """The sample's token count, with the same validation as `render_sft` and one tokenisation (length planning)."""
    check_sft(sample)
    counts = _check_counts(image_token_counts, len(sample.images), sample.origin, "image_token_counts")
    return len(encode_turns(processor, sample.turns, counts, where=str(sample.origin)))


def sft_chunks(
    sample: SFTSample,
    processor: Phi3VProcessor,
    image_token_counts: Sequence[int],
    template: ChatTemplate | None = None,
) -> tuple[list[str], int]:
    """What `sft_length` tokenises, without tokenising it: (the text chunks between the image tags, the image slots),
    so that `sft_length(...) == sum(ChunkCounter(processor.tokenizer).count(chunks)) + slots`. The same validation,
    the same chat template and the same errors as `sft_length` (`Phi3VProcessor.encode_prompt`'s checks);
    `template` (a `ChatTemplate` of this processor) renders it faster, to the same text."""
    check_sft(sample)
    counts = _check_counts(image_token_counts, len(sample.images), sample.origin, "image_token_counts")
    text = (
        template.text(sample.turns)
        if template is not None
        else processor.apply_chat_template(to_messages(sample.turns), add_generation_prompt=False)
    )
    num_images = sum(turn.num_images for turn in sample.turns)
    counts = counts[:num_images]
    return prompt_chunks(text, len(counts), where=str(sample.origin)), sum(counts)


def prompt_chunks(text: str, num_images: int, where: str = "prompt") -> list[str]:
    """The text chunks `Phi3VProcessor.encode_prompt` tokenises one by one (each with its own `<s>`), after the same
    checks with the same errors (tests/data/test_render.py holds the two together)."""
    tags = [int(m) for m in IMAGE_TAG.findall(text)]
    if tags != list(range(1, num_images + 1)):
        raise ValueError(
            f"{where}: image tags {[f'<|image_{t}|>' for t in tags]} do not match the "
            f"{num_images} image(s) given; tags must be <|image_1|> ... <|image_n|>, each once, "
            f"in order, one per image"
        )
    chunks = IMAGE_TAG.split(text)[::2]
    if any(IMAGE_TOKEN in chunk for chunk in chunks):
        raise ValueError(f"{where}: the text holds a literal {IMAGE_TOKEN}; write images as <|image_N|> tags")
    return chunks


class ChatTemplate:
    """`processor.apply_chat_template(to_messages(turns))` (add_generation_prompt=False) for many conversations: the
    messages flattened as `Phi3VProcessor.apply_chat_template` flattens them (an image part is `<|image_k|>\\n`), and
    the template that `transformers` compiles (its own cached compile) rendered with the variables `transformers`
    gives it for plain-text messages (the special tokens, no tools, no documents), without the ~15 us a row of its
    per-call preparation (copying the messages into plain types twice, normalising them). Checked once on a probe
    conversation against `processor.apply_chat_template`; where `transformers` does not offer these pieces, or the
    probe differs, every row goes through `processor.apply_chat_template` itself."""

    PROBE = (
        Turn(role="system", parts=(TextPart(" Be brief.\n"),)),
        Turn(role="user", parts=(ImagePart(), TextPart("What is it? <b>été</b> 🙂"), ImagePart())),
        Turn(role="assistant", parts=(TextPart("  A cat. "),)),
        Turn(role="user", parts=(TextPart("And {{ this }}?"),)),
        Turn(role="assistant", parts=(TextPart(""),)),
    )

    def __init__(self, processor: Phi3VProcessor):
        self.processor = processor
        self.compiled = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

            tokenizer = processor.tokenizer
            self.compiled = _compile_jinja_template(
                tokenizer.get_chat_template(processor.chat_template, None)
            )
            self.variables = _plain_template_data(dict(tokenizer.special_tokens_map))
            if self.text(self.PROBE) != self._slow(self.PROBE):
                self.compiled = None
        except Exception:  # noqa: BLE001 - any change in transformers' internals: the public call
            self.compiled = None

    def _slow(self, turns: Sequence[Turn]) -> str:
        return self.processor.apply_chat_template(to_messages(turns), add_generation_prompt=False)

    def text(self, turns: Sequence[Turn]) -> str:
        if self.compiled is None:
            return self._slow(turns)
        messages, count = [], 0
        for turn in turns:
            pieces = []
            for part in turn.parts:
                if isinstance(part, ImagePart):
                    count += 1
                    pieces.append(f"<|image_{count}|>\n")
                else:
                    pieces.append(part.text or "")
            messages.append({"role": turn.role, "content": "".join(pieces)})
        return self.compiled.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=False, **self.variables
        )


class ChunkCounter:
    """Token counts of text chunks, as `len(tokenizer(chunk, add_special_tokens=True).input_ids)` gives them, for
    many chunks at once: one call of the fast tokenizer's Rust backend per batch (`encode_batch_fast`: no offsets),
    instead of one `transformers` call per chunk (about 50 us of Python each), and a chunk seen before (the
    `<|user|>\\n` before every first image) is counted once. The backend is used only in the state `transformers`
    itself would encode with (no truncation, no padding, special tokens not split); otherwise, or for a tokenizer
    without a Rust backend, each chunk goes through `tokenizer(...)` as before."""

    MEMO_CHARS = 64
    """Only chunks up to this long are remembered (the template's fixed pieces repeat; long texts rarely do)."""
    MEMO_ENTRIES = 100_000

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = (
            backend
            if backend is not None
            and hasattr(backend, "encode_batch_fast")
            and backend.truncation is None
            and backend.padding is None
            and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))
            else None
        )
        self.memo: dict[str, int] = {}

    def count(self, chunks: Sequence[str]) -> list[int]:
        new = [c for c in dict.fromkeys(chunks) if c not in self.memo]
        if self.backend is not None:
            lengths = [len(e.ids) for e in self.backend.encode_batch_fast(new, add_special_tokens=True)]
        else:
            lengths = [len(self.tokenizer(c, add_special_tokens=True).input_ids) for c in new]
        fresh = dict(zip(new, lengths, strict=True))
        if len(self.memo) < self.MEMO_ENTRIES:
            self.memo.update((c, n) for c, n in fresh.items() if len(c) <= self.MEMO_CHARS)
        return [fresh[c] if c in fresh else self.memo[c] for c in chunks]


def _rejected_counts(
    sample: PreferenceSample,
    image_token_counts: tuple[int, ...],
    rejected_image_token_counts: Sequence[int] | None,
) -> tuple[int, ...]:
    if sample.rejected_images is None:
        if rejected_image_token_counts is not None:
            raise ValueError(
                f"{sample.origin}: rejected_image_token_counts given but the sample has no rejected_images"
            )
        return image_token_counts
    if rejected_image_token_counts is None:
        raise ValueError(
            f"{sample.origin}: the sample has rejected_images; pass rejected_image_token_counts, one "
            "count per rejected image"
        )
    return _check_counts(
        rejected_image_token_counts, len(sample.rejected_images), sample.origin, "rejected_image_token_counts"
    )


def render_preference(
    sample: PreferenceSample,
    processor: Phi3VProcessor,
    image_token_counts: Sequence[int],
    rejected_image_token_counts: Sequence[int] | None = None,
) -> RenderedPair:
    """The pair's shared prompt ids and its two completions (see `RenderedPair`)."""
    check_preference(sample)
    origin = sample.origin
    counts = _check_counts(image_token_counts, len(sample.images), origin, "image_token_counts")
    rejected_counts = _rejected_counts(sample, counts, rejected_image_token_counts)
    prompt_ids = encode_turns(
        processor, sample.prompt, counts, add_generation_prompt=True, where=f"{origin} prompt"
    )
    rejected_prompt_ids = prompt_ids
    if rejected_counts != counts:
        rejected_prompt_ids = encode_turns(
            processor,
            sample.prompt,
            rejected_counts,
            add_generation_prompt=True,
            where=f"{origin} prompt (rejected images)",
        )
    chosen_ids, chosen_labels = completion(
        processor, sample.prompt, sample.chosen, counts, prompt_ids, origin, "chosen"
    )
    rejected_ids, rejected_labels = completion(
        processor, sample.prompt, sample.rejected, rejected_counts, rejected_prompt_ids, origin, "rejected"
    )
    return RenderedPair(
        prompt_ids=prompt_ids,
        chosen_ids=chosen_ids,
        chosen_labels=chosen_labels,
        rejected_prompt_ids=rejected_prompt_ids,
        rejected_ids=rejected_ids,
        rejected_labels=rejected_labels,
        image_token_counts=counts,
        rejected_image_token_counts=rejected_counts,
        has_rejected_images=sample.rejected_images is not None,
    )
