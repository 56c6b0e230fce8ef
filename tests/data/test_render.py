"""data.render: ids equal the processor's, labels cover exactly each assistant answer and its <|end|>."""

from __future__ import annotations

import json

import pytest

from data.inspect import format_text, inspect_sample
from data.inspect import main as inspect_main
from data.length import plan_sample
from data.render import (
    IGNORE_INDEX,
    ChatTemplate,
    ChunkCounter,
    prompt_chunks,
    render_preference,
    render_sft,
    to_messages,
)
from data.sample import DataError, ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn
from models.phi3v import Phi3VProcessor, crop_grid
from tests.conftest import PHI3V_HUB, PHI35V_HUB, drawn_image, needs_hub

ORIGIN = Origin(dataset="unit", row=7)
SIZES = [(40, 30), (30, 70), (64, 64)]  # landscape, portrait, square: different crop grids
REF = ImageRef(data=b"never decoded by rendering")


def turn(role: str, *parts: str | ImagePart) -> Turn:
    return Turn(role=role, parts=tuple(TextPart(p) if isinstance(p, str) else p for p in parts))


def sft(*turns: Turn) -> SFTSample:
    num_images = sum(t.num_images for t in turns)
    return SFTSample(turns=turns, images=(REF,) * num_images, origin=ORIGIN)


SAMPLES = {
    "single_turn": sft(turn("user", ImagePart(), "What colour is the shape?"), turn("assistant", "red")),
    "text_only": sft(turn("user", "Which bar is tallest?"), turn("assistant", "The answer is blue")),
    "system_prompt": sft(
        turn("system", "You are a helpful assistant."),
        turn("user", ImagePart(), "Describe the image."),
        turn("assistant", "a red circle"),
    ),
    "multi_image": sft(
        turn("user", ImagePart(), ImagePart(), "Compare the two images."),
        turn("assistant", "The answer is two"),
    ),
    "multi_turn": sft(
        turn("system", "You are a helpful assistant."),
        turn("user", ImagePart(), "How many shapes are there?"),
        turn("assistant", " three"),
        turn("user", "Which bar is tallest?", ImagePart()),
        turn("assistant", "green"),
        turn("user", "What colour is the shape?"),
        turn("assistant", "\nyellow square"),
    ),
}


def counts_for(processor: Phi3VProcessor, num_images: int) -> list[int]:
    return [processor.num_image_tokens(*SIZES[k % len(SIZES)]) for k in range(num_images)]


def images_for(num_images: int) -> list:
    return [drawn_image(*SIZES[k % len(SIZES)], seed=k) for k in range(num_images)]


def processor_ids(processor: Phi3VProcessor, turns, add_generation_prompt: bool = False) -> list[int]:
    """The reference: what the processor itself gives for the template text and the real images."""
    text = processor.apply_chat_template(to_messages(turns), add_generation_prompt=add_generation_prompt)
    num_images = sum(t.num_images for t in turns)
    return processor(text=text, images=images_for(num_images) or None)["input_ids"][0].tolist()


def check_label_spans(
    processor: Phi3VProcessor, sample: SFTSample, labels: list[int], supervised: list[int]
) -> None:
    """For each supervised assistant turn k: the processor's ids of (turns before k + generation prompt) are a
    prefix of the full ids, and the labels are exactly the following tokens up to and including <|end|>."""
    full = processor_ids(processor, sample.turns)
    end_id = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    expected = [IGNORE_INDEX] * len(full)
    for k in supervised:
        prefix = processor_ids(processor, sample.turns[:k], add_generation_prompt=True)
        assert full[: len(prefix)] == prefix
        stop = full.index(end_id, len(prefix)) + 1
        expected[len(prefix) : stop] = full[len(prefix) : stop]
        decoded = processor.tokenizer.decode(full[len(prefix) : stop])
        assert decoded == sample.turns[k].text.strip() + "<|end|>"
    assert labels == expected


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_ids_equal_the_processor_ids(tiny_processor, name):
    sample = SAMPLES[name]
    rendered = render_sft(sample, tiny_processor, counts_for(tiny_processor, len(sample.images)))
    assert rendered.input_ids == processor_ids(tiny_processor, sample.turns)
    assert rendered.num_images == len(sample.images)
    assert len(rendered.labels) == len(rendered.input_ids)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_labels_cover_each_answer_and_its_end_token(tiny_processor, name):
    sample = SAMPLES[name]
    rendered = render_sft(sample, tiny_processor, counts_for(tiny_processor, len(sample.images)))
    assistant = [k for k, t in enumerate(sample.turns) if t.role == "assistant"]
    check_label_spans(tiny_processor, sample, rendered.labels, assistant)


def test_last_supervises_only_the_final_answer(tiny_processor):
    sample = SAMPLES["multi_turn"]
    counts = counts_for(tiny_processor, len(sample.images))
    every = render_sft(sample, tiny_processor, counts, assistant_turns="all")
    last = render_sft(sample, tiny_processor, counts, assistant_turns="last")
    assert last.input_ids == every.input_ids
    check_label_spans(tiny_processor, sample, last.labels, [len(sample.turns) - 1])
    assert 0 < last.num_supervised < every.num_supervised


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_no_image_slot_role_tag_bos_or_trailing_newline_is_labelled(tiny_processor, name):
    sample = SAMPLES[name]
    rendered = render_sft(sample, tiny_processor, counts_for(tiny_processor, len(sample.images)))
    tokenizer = tiny_processor.tokenizer
    never = {
        tiny_processor.image_token_id,
        tokenizer.bos_token_id,
        *tokenizer.convert_tokens_to_ids(["<|user|>", "<|system|>", "<|assistant|>"]),
    }
    for token, label in zip(rendered.input_ids, rendered.labels):
        assert label in (IGNORE_INDEX, token)
        if token in never:
            assert label == IGNORE_INDEX
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    supervised_ends = [i for i, label in enumerate(rendered.labels) if label == end_id]
    assert supervised_ends and all(rendered.labels[i + 1] == IGNORE_INDEX for i in supervised_ends)


def test_no_endoftext_is_appended(tiny_processor):
    sample = SAMPLES["single_turn"]
    rendered = render_sft(sample, tiny_processor, counts_for(tiny_processor, 1))
    tail = tiny_processor.tokenizer("<|end|>\n", add_special_tokens=False).input_ids
    assert rendered.input_ids[-len(tail) :] == tail
    assert tiny_processor.tokenizer.eos_token_id not in rendered.input_ids


# ------------------------------------------------------------------------------------------------ preference


def preference(*, rejected_images: bool = False) -> PreferenceSample:
    prompt = (
        turn("system", "You are a helpful assistant."),
        turn("user", ImagePart(), "How many shapes are there?"),
    )
    return PreferenceSample(
        prompt=prompt,
        chosen=turn("assistant", "two"),
        rejected=turn("assistant", "four circle"),
        images=(REF,),
        origin=ORIGIN,
        rejected_images=(REF,) if rejected_images else None,
    )


def test_pair_sequences_equal_the_full_render_of_each_conversation(tiny_processor):
    sample = preference()
    counts = counts_for(tiny_processor, 1)
    pair = render_preference(sample, tiny_processor, counts)
    assert pair.prompt_ids == processor_ids(tiny_processor, sample.prompt, add_generation_prompt=True)
    assert pair.rejected_prompt_ids == pair.prompt_ids
    for answer, (ids, labels) in (
        (sample.chosen, pair.chosen_sequence()),
        (sample.rejected, pair.rejected_sequence()),
    ):
        full = render_sft(
            SFTSample(turns=(*sample.prompt, answer), images=sample.images, origin=ORIGIN),
            tiny_processor,
            counts,
        )
        assert (ids, labels) == (full.input_ids, full.labels)
    tail = tiny_processor.tokenizer("<|end|>\n", add_special_tokens=False).input_ids
    assert pair.chosen_ids[-len(tail) :] == tail
    assert pair.chosen_labels[-len(tail) :] == [tail[0]] + [IGNORE_INDEX] * (len(tail) - 1)
    assert pair.num_tokens == max(len(pair.chosen_sequence()[0]), len(pair.rejected_sequence()[0]))


def test_image_contrast_pair_renders_the_rejected_prompt_with_its_own_image(tiny_processor):
    sample = preference(rejected_images=True)
    counts, rejected_counts = (
        [tiny_processor.num_image_tokens(40, 30)],
        [tiny_processor.num_image_tokens(30, 70)],
    )
    assert counts != rejected_counts
    pair = render_preference(sample, tiny_processor, counts, rejected_counts)
    assert pair.has_rejected_images and pair.rejected_image_token_counts == tuple(rejected_counts)
    assert pair.rejected_prompt_ids.count(tiny_processor.image_token_id) == rejected_counts[0]
    full = render_sft(
        SFTSample(turns=(*sample.prompt, sample.rejected), images=sample.images, origin=ORIGIN),
        tiny_processor,
        rejected_counts,
    )
    assert pair.rejected_sequence() == (full.input_ids, full.labels)
    with pytest.raises(ValueError, match="rejected_image_token_counts"):
        render_preference(sample, tiny_processor, counts)


# ------------------------------------------------------------------------------------------------ errors


def test_image_count_mismatch_names_origin_and_field(tiny_processor):
    sample = SFTSample(turns=SAMPLES["single_turn"].turns, images=(REF, REF), origin=ORIGIN)
    with pytest.raises(DataError, match=r"unit row 7, field 'images': image count mismatch") as caught:
        render_sft(sample, tiny_processor, [5, 5])
    assert caught.value.origin == ORIGIN


@pytest.mark.parametrize("text", ["see <|image|> here", "see <|image_1|> here"])
def test_literal_image_token_or_tag_in_text_is_a_data_error(tiny_processor, text):
    sample = sft(turn("user", text), turn("assistant", "red"))
    with pytest.raises(DataError, match=r"unit row 7, field 'turns\[0\]': literal image"):
        render_sft(sample, tiny_processor, [])


def test_image_in_an_assistant_turn_is_a_data_error(tiny_processor):
    sample = sft(turn("user", "Describe the image."), turn("assistant", ImagePart(), "red"))
    with pytest.raises(DataError, match=r"field 'turns\[1\]': image in an assistant turn"):
        render_sft(sample, tiny_processor, [5])


def test_rejected_images_count_mismatch_is_a_data_error(tiny_processor):
    sample = PreferenceSample(
        prompt=preference().prompt,
        chosen=turn("assistant", "two"),
        rejected=turn("assistant", "one"),
        images=(REF,),
        origin=ORIGIN,
        rejected_images=(REF, REF),
    )
    with pytest.raises(DataError, match="field 'rejected_images': image count mismatch"):
        render_preference(sample, tiny_processor, [5], [5, 5])


def test_wrong_number_of_token_counts_is_a_caller_error(tiny_processor):
    with pytest.raises(ValueError, match="1 image_token_counts given for 2 image"):
        render_sft(SAMPLES["multi_image"], tiny_processor, [5])


# ------------------------------------------------------------------------------------------------ real tokenizer


@pytest.fixture(scope="module")
def hub_processor():
    return Phi3VProcessor.from_pretrained(PHI3V_HUB)


@needs_hub(PHI3V_HUB)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_hub_processor_ids_and_label_spans(hub_processor, name):
    sample = SAMPLES[name]
    rendered = render_sft(sample, hub_processor, counts_for(hub_processor, len(sample.images)))
    assert rendered.input_ids == processor_ids(hub_processor, sample.turns)
    assistant = [k for k, t in enumerate(sample.turns) if t.role == "assistant"]
    check_label_spans(hub_processor, sample, rendered.labels, assistant)


@needs_hub(PHI3V_HUB)
def test_hub_ids_match_the_recorded_official_layout(hub_processor):
    """docs/phi3v.md#tokenizer-ids-and-chat-template: [1, 32010, 29871, 13, image x N, 1, 29871, 13, ..., 32007, 29871, 13, 32001, 319(▁A),
    6635, 29889, 32007, 29871, 13]; the answer's leading space is swallowed by <|assistant|> (rstrip)."""
    for answer in ("A cat.", " A cat."):
        sample = sft(turn("user", ImagePart(), "What is shown?"), turn("assistant", answer))
        rendered = render_sft(sample, hub_processor, [2509])
        ids = rendered.input_ids
        assert ids[:4] == [1, 32010, 29871, 13] and ids[4 : 4 + 2509] == [32044] * 2509
        assert ids[2513:2516] == [1, 29871, 13]
        assert ids[-10:] == [32007, 29871, 13, 32001, 319, 6635, 29889, 32007, 29871, 13]
        assert rendered.labels[-7:] == [IGNORE_INDEX, 319, 6635, 29889, 32007, IGNORE_INDEX, IGNORE_INDEX]
        assert rendered.num_supervised == 4


# ------------------------------------------------------------------------------------------------ inspector


def test_inspector_collapses_image_slots_and_marks_supervised_spans(tiny_processor, tmp_path):
    refs = []
    for k, size in enumerate(SIZES[:2]):
        drawn_image(*size, seed=k).save(tmp_path / f"{k}.png")
        refs.append(ImageRef(path=tmp_path / f"{k}.png"))
    sample = SFTSample(turns=SAMPLES["multi_turn"].turns, images=tuple(refs), origin=ORIGIN)
    plan = plan_sample(sample, tiny_processor)
    shown = format_text(inspect_sample(plan, tiny_processor, max_length=plan.num_tokens - 1))
    for k, size in enumerate(SIZES[:2]):
        rows, cols = crop_grid(*size, num_crops=4, crop_size=32)
        assert f"<image {k + 1}: {rows}x{cols} crops, {plan.image_token_counts[k]} tokens>" in shown
    assert "<|image|>" not in shown
    assert shown.count("⟦") == shown.count("⟧") == 3
    assert "⟦ three<|end|>⟧" in shown and "⟦ green<|end|>⟧" in shown
    assert f"{plan.num_tokens} tokens" in shown and "OVER max_length" in shown


def test_inspector_cli_prints_and_writes_html(tmp_path, capsys):
    drawn_image(40, 30).save(tmp_path / "a.png")
    user = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
    }
    sft_rows = [
        {"messages": [user, {"role": "assistant", "content": answer}], "images": ["a.png"]}
        for answer in ("red", "blue")
    ]
    pair = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "green"}],
        "images": ["a.png"],
    }
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(row) for row in sft_rows))
    (tmp_path / "pref.jsonl").write_text(json.dumps(pair))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  name_or_path: tiny\n  num_crops: 4\ndata:\n  train:\n"
        f"    - {{format: trl_messages, path: {tmp_path / 'sft.jsonl'}}}\n"
        f"    - {{format: trl_preference, path: {tmp_path / 'pref.jsonl'}}}\n"
        "stages: [sft, dpo]\ntrain:\n  max_steps: 1\n"
    )
    page = tmp_path / "page.html"
    assert inspect_main([str(recipe), "--n", "1", "--html", str(page), "data.assistant_turns=last"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and out.count("<image 1: 2x2 crops, 27 tokens>") == 2
    assert (
        "⟦ red<|end|>⟧" in out
        and "--- chosen\n⟦ red<|end|>⟧" in out
        and "--- rejected\n⟦ green<|end|>⟧" in out
    )
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and html.count("<mark>") == 3


# ------------------------------------------------------------------------------------------------ counting only


@pytest.mark.parametrize(
    "text,num_images",
    [
        ("<|user|>\n<|image_1|>\nQ?<|end|>\n", 1),
        ("a<|image_1|>b<|image_2|>c", 2),
        ("no image at all", 0),
        ("<|image_2|>a", 1),
        ("<|image_1|><|image_1|>", 2),
        ("a<|image|>b", 0),
        ("<|image_1|>", 0),
    ],
)
def test_prompt_chunks_check_and_count_as_encode_prompt(tiny_processor, text, num_images):
    """`prompt_chunks` + `ChunkCounter` (length planning) give `len(encode_prompt(...))`, or its exact error."""
    counts = [3 + k for k in range(num_images)]
    try:
        expected = ("ids", len(tiny_processor.encode_prompt(text, counts, where="row 7")))
    except ValueError as error:
        expected = ("error", str(error))
    try:
        chunks = prompt_chunks(text, num_images, where="row 7")
        got = ("ids", sum(ChunkCounter(tiny_processor.tokenizer).count(chunks)) + sum(counts))
    except ValueError as error:
        got = ("error", str(error))
    assert got == expected


COUNTED_CHUNKS = [
    "",
    " ",
    "\n",
    "<|user|>\n",
    "\nWhat is it?<|end|>\n<|assistant|>\nred<|end|>\n",
    "<s>",
    "<|end|><|endoftext|>",
    "  leading and trailing  ",
    "été, 漢字 and 🙂 — ünïcödé",
    "word " * 300,
    "<|user|>\n",  # repeated: counted from the memo
]


def check_chunk_counter(tokenizer) -> None:
    chunks = COUNTED_CHUNKS
    expected = [len(tokenizer(chunk, add_special_tokens=True).input_ids) for chunk in chunks]
    counter = ChunkCounter(tokenizer)
    assert counter.backend is not None
    assert counter.count(chunks) == expected
    assert counter.count(chunks[::-1]) == expected[::-1]  # now partly from the memo
    assert "<|user|>\n" in counter.memo and "word " * 300 not in counter.memo
    plain = ChunkCounter(tokenizer)
    plain.backend = None
    assert plain.count(chunks) == expected


def test_chunk_counter_counts_as_the_tokenizer_does(tiny_processor):
    """The Rust backend in one call (and the memo of short chunks) counts every chunk as
    `tokenizer(chunk, add_special_tokens=True)` does; without a backend it calls the tokenizer itself."""
    check_chunk_counter(tiny_processor.tokenizer)


@needs_hub(PHI3V_HUB)
def test_chunk_counter_counts_as_the_hub_tokenizer_does(hub_processor):
    check_chunk_counter(hub_processor.tokenizer)


def check_chat_template(processor) -> None:
    template = ChatTemplate(processor)
    assert template.compiled is not None  # the fast rendering is in use with this transformers
    conversations = [sample.turns for sample in SAMPLES.values()] + [ChatTemplate.PROBE]
    conversations += [
        (Turn(role="user", parts=(TextPart(text),)), Turn(role="assistant", parts=(TextPart(text),)))
        for text in COUNTED_CHUNKS
    ]
    for turns in conversations:
        assert template.text(turns) == processor.apply_chat_template(to_messages(turns))


def test_chat_template_renders_as_the_processor_does(tiny_processor):
    """`ChatTemplate` (transformers' compiled template rendered directly) gives the processor's text."""
    check_chat_template(tiny_processor)


@pytest.mark.parametrize("hub", [pytest.param(hub, marks=needs_hub(hub)) for hub in (PHI3V_HUB, PHI35V_HUB)])
def test_chat_template_renders_as_the_hub_processor_does(hub):
    check_chat_template(Phi3VProcessor.from_pretrained(hub))
