"""data.length: token lengths planned from image headers, over-long and bad-row policies, length-grouped batching."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from data.images import DEFAULT_MAX_PIXELS
from data.length import BatchPlanner, _numbers_of, plan_lengths, plan_sample
from data.render import render_preference, render_sft
from data.sample import DataError, ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn
from data.samplers import LengthGroupedSampler
from data.sources import SkipCounter
from tests.conftest import drawn_image


def png(tmp_path: Path, name: str, size: tuple[int, int]) -> ImageRef:
    path = tmp_path / f"{name}.png"
    drawn_image(*size).save(path)
    return ImageRef(path=path)


def image_sample(
    row: int, refs: tuple[ImageRef, ...], answer: str = "red", dataset: str = "charts"
) -> SFTSample:
    user = Turn(role="user", parts=(*(ImagePart() for _ in refs), TextPart("What colour is the shape?")))
    return SFTSample(
        turns=(user, Turn(role="assistant", parts=(TextPart(answer),))),
        images=refs,
        origin=Origin(dataset=dataset, row=row),
    )


def test_lengths_and_token_counts_come_from_the_headers(tiny_processor, tmp_path):
    refs = (png(tmp_path, "wide", (90, 30)), png(tmp_path, "tall", (30, 70)))
    sample = image_sample(0, refs)
    [plan] = plan_lengths([sample], tiny_processor, max_length=10_000, skips=SkipCounter())
    counts = (tiny_processor.num_image_tokens(90, 30), tiny_processor.num_image_tokens(30, 70))
    assert plan.image_token_counts == counts and plan.image_sizes == ((90, 30), (30, 70))
    assert plan.num_tokens == len(render_sft(sample, tiny_processor, counts).input_ids)


def test_planning_reads_no_pixel_data(tiny_processor, tmp_path):
    """A PNG cut after its header plans fine (decoding its pixels would fail): sizes come from the header alone."""
    whole = tmp_path / "whole.png"
    drawn_image(64, 48).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:100])
    [plan] = plan_lengths(
        [image_sample(0, (ImageRef(path=cut),))], tiny_processor, max_length=10_000, skips=SkipCounter()
    )
    assert plan.image_sizes == ((64, 48),)


def test_overlong_samples_are_dropped_counted_and_logged(tiny_processor, tmp_path, caplog):
    ref = png(tmp_path, "a", (40, 30))
    samples = [
        image_sample(0, (ref,)),
        image_sample(1, (ref, ref, ref)),
        image_sample(2, ()),
        image_sample(3, (ref, ref, ref), dataset="docs"),
    ]
    lengths = [
        plan.num_tokens
        for plan in plan_lengths(samples, tiny_processor, max_length=10_000, skips=SkipCounter())
    ]
    skips = SkipCounter()
    with caplog.at_level(logging.INFO):
        kept = plan_lengths(samples, tiny_processor, max_length=lengths[0], on_overlong="drop", skips=skips)
    assert [plan.sample.origin.row for plan in kept] == [0, 2]
    assert skips.counts() == {"charts": {"over-long": 1}, "docs": {"over-long": 1}}
    assert "over-long" in skips.summary() and "over-long" in caplog.text


def test_overlong_error_names_dataset_row_and_length(tiny_processor, tmp_path):
    ref = png(tmp_path, "a", (40, 30))
    sample = image_sample(5, (ref, ref))
    length = plan_lengths([sample], tiny_processor, max_length=10_000, skips=SkipCounter())[0].num_tokens
    with pytest.raises(
        DataError,
        match=rf"charts row 5, field 'turns': over-long: {length} tokens .*"
        rf"data.max_length={length - 1}",
    ):
        plan_lengths(
            [sample], tiny_processor, max_length=length - 1, on_overlong="error", skips=SkipCounter()
        )


def test_bad_images_raise_or_are_counted(tiny_processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    good, bad = image_sample(0, (png(tmp_path, "a", (40, 30)),)), image_sample(1, (ImageRef(path=broken),))
    with pytest.raises(DataError, match=r"charts row 1, field 'images\[0\]'"):
        plan_lengths(
            [good, bad], tiny_processor, max_length=10_000, on_bad_sample="error", skips=SkipCounter()
        )
    skips = SkipCounter()
    kept = plan_lengths([good, bad], tiny_processor, max_length=10_000, on_bad_sample="skip", skips=skips)
    assert [plan.sample.origin.row for plan in kept] == [0] and skips.counts() == {"charts": {"bad image": 1}}


def test_too_elongated_image_is_a_data_error(tiny_processor, tmp_path):
    sample = image_sample(3, (png(tmp_path, "strip", (1000, 1)),))
    with pytest.raises(DataError, match=r"row 3, field 'images\[0\]': unusable image size"):
        plan_lengths([sample], tiny_processor, max_length=10_000, skips=SkipCounter())


def test_max_image_pixels_is_enforced_from_the_header(tiny_processor, tmp_path):
    sample = image_sample(0, (png(tmp_path, "a", (40, 30)),))
    with pytest.raises(DataError, match="decompression-bomb"):
        plan_lengths([sample], tiny_processor, max_length=10_000, max_image_pixels=1000, skips=SkipCounter())


def test_preference_length_is_the_longer_sequence(tiny_processor, tmp_path):
    small, large = png(tmp_path, "small", (40, 30)), png(tmp_path, "large", (30, 120))
    prompt = (Turn(role="user", parts=(ImagePart(), TextPart("How many shapes are there?"))),)
    sample = PreferenceSample(
        prompt=prompt,
        chosen=Turn(role="assistant", parts=(TextPart("one"),)),
        rejected=Turn(role="assistant", parts=(TextPart("two"),)),
        images=(small,),
        origin=Origin(dataset="pairs", row=0),
        rejected_images=(large,),
    )
    [plan] = plan_lengths([sample], tiny_processor, max_length=10_000, skips=SkipCounter())
    counts, rejected = [tiny_processor.num_image_tokens(40, 30)], [tiny_processor.num_image_tokens(30, 120)]
    assert plan.rejected_image_token_counts == tuple(rejected) and plan.rejected_image_sizes == ((30, 120),)
    pair = render_preference(sample, tiny_processor, counts, rejected)
    assert plan.num_tokens == len(pair.rejected_sequence()[0]) > len(pair.chosen_sequence()[0])


# ------------------------------------------------------------------------------------------------ batching

LENGTHS = [(i * 37) % 101 + 1 for i in range(103)]  # 103 samples, lengths 1..101 in a scrambled order


def rank_batches(num_replicas: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    batches = []
    for rank in range(num_replicas):
        sampler = LengthGroupedSampler(
            LENGTHS, 4, seed=3, mega_batch_mult=5, num_replicas=num_replicas, rank=rank, **kwargs
        )
        sampler.set_epoch(epoch)
        batches.append(list(sampler))
        assert len(batches[-1]) == len(sampler)
    return batches


def test_sampler_is_deterministic_per_seed_and_epoch():
    assert rank_batches(2, epoch=0) == rank_batches(2, epoch=0)
    assert rank_batches(2, epoch=0) != rank_batches(2, epoch=1)
    other_seed = list(LengthGroupedSampler(LENGTHS, 4, seed=4, mega_batch_mult=5))
    assert other_seed != rank_batches(1)[0]


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_sampler_shards_every_index_into_equal_full_batches(num_replicas):
    per_rank = rank_batches(num_replicas)
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(len(LENGTHS)))
    assert len(seen) - len(LENGTHS) < 4 * num_replicas  # only the wrap-around padding repeats


def test_sampler_drop_last_repeats_nothing():
    per_rank = rank_batches(2, drop_last=True)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == (len(LENGTHS) // 8) * 8


def test_sampler_groups_similar_lengths_and_starts_with_the_longest():
    [batches] = rank_batches(1)
    padded = sum(len(batch) * max(LENGTHS[i] for i in batch) for batch in batches)
    shuffled = list(range(len(LENGTHS)))
    random_padded = sum(4 * max(LENGTHS[i] for i in shuffled[s : s + 4]) for s in range(0, len(shuffled), 4))
    assert padded < 0.8 * random_padded
    assert max(LENGTHS) == LENGTHS[batches[0][0]]
    # The ranks of one step get neighbouring lengths: rank 0's batch is never shorter than rank 1's.
    rank0, rank1 = rank_batches(2)
    assert all(min(LENGTHS[i] for i in a) >= max(LENGTHS[i] for i in b) for a, b in zip(rank0, rank1))


def varied_samples(tmp_path: Path) -> list:
    """SFT samples of every shape planning meets (no image, one, two, images in a later turn, a system turn, odd
    text, a bad file, a too-small count...) and preference pairs."""
    a, b = png(tmp_path, "a", (40, 30)), png(tmp_path, "b", (64, 64))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")

    def turn(role: str, *parts) -> Turn:
        return Turn(role=role, parts=tuple(TextPart(p) if isinstance(p, str) else p for p in parts))

    def sft(row: int, images: tuple, *turns: Turn) -> SFTSample:
        return SFTSample(turns=turns, images=images, origin=Origin(dataset="d", row=row))

    texts = ["What colour?", "  padded  ", "été, 漢字 and 🙂", "line\nbreak", "word " * 40, "x"]
    samples: list = []
    for i, text in enumerate(texts):
        samples += [
            sft(10 * i, (), turn("user", text), turn("assistant", texts[i - 1])),
            sft(10 * i + 1, (a,), turn("user", ImagePart(), text), turn("assistant", "red")),
            sft(10 * i + 2, (a, b), turn("user", ImagePart(), ImagePart(), text), turn("assistant", text)),
            sft(
                10 * i + 3,
                (b,),
                turn("system", "Be brief."),
                turn("user", text),
                turn("assistant", "ok"),
                turn("user", ImagePart(), "and this?"),
                turn("assistant", text),
            ),
            sft(10 * i + 4, (ImageRef(path=bad),), turn("user", ImagePart(), text), turn("assistant", "no")),
            sft(10 * i + 5, (a,), turn("user", text), turn("assistant", "two parts")),  # image count mismatch
        ]
    user = turn("user", ImagePart(), "Which is it?")
    samples.append(
        PreferenceSample(
            prompt=(user,),
            chosen=turn("assistant", "the red one"),
            rejected=turn("assistant", "blue"),
            images=(a,),
            origin=Origin(dataset="d", row=99),
        )
    )
    return samples


def straightforward_numbers(samples, processor) -> list[tuple]:
    """Each sample planned alone by `plan_sample` (a transformers tokenizer call per chunk)."""
    results = []
    for sample in samples:
        try:
            results.append(_numbers_of(plan_sample(sample, processor)))
        except DataError as error:
            results.append((None, error.field, error.problem))
    return results


@pytest.mark.parametrize("batch", [1, 4, 256])
def test_batched_planning_equals_planning_each_sample_alone(tiny_processor, tmp_path, batch):
    """`BatchPlanner` (the chunks of a batch counted in one tokenizer call, short chunks remembered) gives
    `plan_sample`'s numbers and errors, sample by sample, with the tokenizer's Rust backend and without it."""
    samples = varied_samples(tmp_path)
    expected = straightforward_numbers(samples, tiny_processor)
    assert sum(result[0] is None for result in expected) == 12  # the bad files and the mismatched counts
    for backend in (True, False):
        planner = BatchPlanner(tiny_processor, DEFAULT_MAX_PIXELS)
        if not backend:
            planner.counter.backend = None
        got = []
        for start in range(0, len(samples), batch):
            got += planner.numbers(samples[start : start + batch])
        assert got == expected
    first_bad = next(k for k, result in enumerate(expected) if result[0] is None)
    stopped = BatchPlanner(tiny_processor, DEFAULT_MAX_PIXELS).numbers(samples, stop_at_error=True)
    assert stopped == expected[: first_bad + 1]
