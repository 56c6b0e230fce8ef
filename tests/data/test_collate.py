"""data.collate: rows from planned samples, padded/packed SFT batches and DPO batches that carry each image once."""

from __future__ import annotations

import copy
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

import data.collate
from data.collate import DPOCollator, PackedSFTCollator, RenderedDataset, SFTCollator
from data.images import load_rgb
from data.length import plan_lengths
from data.render import IGNORE_INDEX, render_sft
from data.sample import ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn
from data.sources import SkipCounter
from tests.conftest import drawn_image


def png(tmp_path: Path, name: str, size: tuple[int, int], seed: int = 0) -> ImageRef:
    path = tmp_path / f"{name}.png"
    drawn_image(*size, seed=seed).save(path)
    return ImageRef(path=path)


def text(role: str, value: str) -> Turn:
    return Turn(role=role, parts=(TextPart(value),))


def sft_sample(row: int, refs: tuple[ImageRef, ...], question: str, answer: str) -> SFTSample:
    user = Turn(role="user", parts=(*(ImagePart() for _ in refs), TextPart(question)))
    return SFTSample(
        turns=(user, text("assistant", answer)), images=refs, origin=Origin(dataset="mix", row=row)
    )


@pytest.fixture()
def sft_rows(tiny_processor, tmp_path):
    """Three rows: one image, text-only, two images (different grids)."""
    samples = [
        sft_sample(0, (png(tmp_path, "a", (40, 30), 1),), "What colour is the shape?", "red"),
        sft_sample(1, (), "Which bar is tallest?", "The answer is blue"),
        sft_sample(
            2,
            (png(tmp_path, "b", (30, 70), 2), png(tmp_path, "c", (64, 64), 3)),
            "Compare the two images.",
            "two",
        ),
    ]
    planned = plan_lengths(samples, tiny_processor, max_length=4096, skips=SkipCounter())
    return [RenderedDataset(planned, tiny_processor)[i] for i in range(len(planned))], samples


def test_dataset_rows_hold_rendered_ids_and_uint8_crops_of_the_real_grid(tiny_processor, sft_rows):
    rows, samples = sft_rows
    for row, sample in zip(rows, samples):
        counts = [
            tiny_processor.num_image_tokens(*load_rgb(r, sample.origin, "images").size) for r in sample.images
        ]
        rendered = render_sft(sample, tiny_processor, counts)
        assert (row["input_ids"], row["labels"]) == (rendered.input_ids, rendered.labels)
        assert row["pixel_values"].dtype == torch.uint8 and row["image_sizes"].shape == (
            len(sample.images),
            2,
        )
        if sample.images:
            images = [load_rgb(r, sample.origin, "images") for r in sample.images]
            expected = tiny_processor.image_processor(images, do_normalize=False)
            assert torch.equal(row["pixel_values"], expected["pixel_values"])
            grid_crops = sum(int(h * w) // 32**2 for h, w in row["image_sizes"].tolist())
            assert row["pixel_values"].shape[0] == grid_crops  # no global crop, no padding crops


def test_dataset_survives_pickling_for_spawned_workers(tiny_processor, sft_rows, tmp_path):
    sample = sft_sample(0, (png(tmp_path, "p", (40, 30)),), "What colour is the shape?", "red")
    dataset = RenderedDataset(
        plan_lengths([sample], tiny_processor, max_length=4096, skips=SkipCounter()), tiny_processor
    )
    assert pickle.loads(pickle.dumps(dataset))[0]["input_ids"] == dataset[0]["input_ids"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sft_collator_pads_masks_and_concatenates_images_in_row_order(sft_rows, padding_side):
    rows, _ = sft_rows
    before = copy.deepcopy(rows)
    batch = SFTCollator(pad_token_id=0, padding_side=padding_side)(rows)
    longest = max(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        tokens = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        pad = slice(n, longest) if padding_side == "right" else slice(0, longest - n)
        assert batch["input_ids"][b, tokens].tolist() == row["input_ids"]
        assert batch["labels"][b, tokens].tolist() == row["labels"]
        assert batch["attention_mask"][b, tokens].eq(1).all() and batch["attention_mask"][b, pad].eq(0).all()
        assert batch["input_ids"][b, pad].eq(0).all() and batch["labels"][b, pad].eq(IGNORE_INDEX).all()
    assert torch.equal(batch["pixel_values"], torch.cat([rows[0]["pixel_values"], rows[2]["pixel_values"]]))
    assert batch["image_sizes"].tolist() == rows[0]["image_sizes"].tolist() + rows[2]["image_sizes"].tolist()
    shifted = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    assert batch["num_supervised_tokens"].ndim == 0 and int(batch["num_supervised_tokens"]) == shifted
    assert_rows_unchanged(rows, before)


def assert_rows_unchanged(rows, before) -> None:
    for row, old in zip(rows, before):
        assert row.keys() == old.keys()
        for key, value in row.items():
            same = torch.equal(value, old[key]) if isinstance(value, torch.Tensor) else value == old[key]
            assert same, key


def test_text_only_batch_has_no_image_keys(sft_rows):
    rows, _ = sft_rows
    batch = SFTCollator(pad_token_id=0)([rows[1], {"input_ids": [1, 5, 6], "labels": [IGNORE_INDEX, 5, 6]}])
    assert "pixel_values" not in batch and "image_sizes" not in batch
    assert (
        int(batch["num_supervised_tokens"])
        == sum(label != IGNORE_INDEX for label in rows[1]["labels"][1:]) + 2
    )


def test_collators_refuse_a_missing_pad_id():
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTCollator(pad_token_id=None)
    assert SFTCollator(pad_token_id=0).pad_token_id == 0  # 0 is a real id, not "unset"


def test_module_docstring_example_runs():
    example = textwrap.dedent(data.collate.__doc__.split("::\n", 1)[1])
    exec(compile(example, "data/collate.py docstring", "exec"), {})


# ------------------------------------------------------------------------------------------------ packing


def test_packed_layout(sft_rows):
    rows, _ = sft_rows
    before = copy.deepcopy(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    batch = PackedSFTCollator(max_tokens=sum(lengths))(rows)
    assert (
        batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lengths))
    )
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    for start, row in zip(batch["cu_seqlens"][:-1].tolist(), rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert batch["labels"][0, start + 1 : start + n].tolist() == row["labels"][1:]
    assert int(batch["num_supervised_tokens"]) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert batch["image_sizes"].shape == (3, 2)
    assert_rows_unchanged(rows, before)
    with pytest.raises(ValueError, match="over the packing budget"):
        PackedSFTCollator(max_tokens=sum(lengths) - 1)(rows)


def test_packed_logits_equal_each_sample_run_alone(tiny_model, sft_rows):
    rows, _ = sft_rows
    packed = PackedSFTCollator(max_tokens=4096)(rows)
    keys = ("input_ids", "position_ids", "pixel_values", "image_sizes", "use_cache")
    with torch.no_grad():
        logits = tiny_model(**{key: packed[key] for key in keys}).logits[0]
        for start, row in zip(packed["cu_seqlens"][:-1].tolist(), rows):
            alone = SFTCollator(pad_token_id=0)([row])
            inputs = {key: alone[key] for key in ("input_ids", "pixel_values", "image_sizes") if key in alone}
            expected = tiny_model(**inputs).logits[0]
            assert torch.allclose(logits[start : start + len(row["input_ids"])], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DPO


def pair_row(
    tiny_processor,
    tmp_path: Path,
    row: int,
    sizes: list[tuple[int, int]],
    rejected_size: tuple[int, int] | None = None,
) -> dict:
    refs = tuple(png(tmp_path, f"p{row}_{k}", size, seed=10 * row + k) for k, size in enumerate(sizes))
    prompt = (
        Turn(role="user", parts=(*(ImagePart() for _ in refs), TextPart("How many shapes are there?"))),
    )
    rejected_images = (png(tmp_path, f"r{row}", rejected_size, seed=99 + row),) if rejected_size else None
    sample = PreferenceSample(
        prompt=prompt,
        chosen=text("assistant", "two"),
        rejected=text("assistant", "four"),
        images=refs,
        origin=Origin(dataset="pairs", row=row),
        rejected_images=rejected_images,
    )
    planned = plan_lengths([sample], tiny_processor, max_length=4096, skips=SkipCounter())
    return RenderedDataset(planned, tiny_processor)[0]


@pytest.fixture()
def dpo_rows(tiny_processor, tmp_path):
    """A one-image pair, a text-only pair, a two-image pair, and an image-contrast pair."""
    return [
        pair_row(tiny_processor, tmp_path, 0, [(40, 30)]),
        pair_row(tiny_processor, tmp_path, 1, []),
        pair_row(tiny_processor, tmp_path, 2, [(30, 70), (64, 64)]),
        pair_row(tiny_processor, tmp_path, 3, [(40, 30)], rejected_size=(30, 120)),
    ]


def test_dpo_batch_carries_each_image_once(dpo_rows):
    before = copy.deepcopy(dpo_rows)
    batch = DPOCollator(pad_token_id=0)(dpo_rows)
    num_pairs = len(dpo_rows)
    assert (
        batch["input_ids"].shape[0]
        == batch["labels"].shape[0]
        == batch["attention_mask"].shape[0]
        == 2 * num_pairs
    )
    for b, row in enumerate(dpo_rows):
        for r, (ids, labels) in (
            (b, row["pair"].chosen_sequence()),
            (num_pairs + b, row["pair"].rejected_sequence()),
        ):
            assert batch["input_ids"][r, : len(ids)].tolist() == ids
            assert batch["labels"][r, : len(ids)].tolist() == labels
            assert batch["labels"][r, len(ids) :].eq(IGNORE_INDEX).all()
    unique = [
        dpo_rows[0]["pixel_values"],
        dpo_rows[2]["pixel_values"],
        dpo_rows[3]["pixel_values"],
        dpo_rows[3]["rejected_pixel_values"],
    ]
    assert torch.equal(batch["pixel_values"], torch.cat(unique))
    assert batch["image_sizes"].shape == (5, 2)
    assert batch["sequence_images"] == [[0], [], [1, 2], [3], [0], [], [1, 2], [4]]
    used = sorted({i for images in batch["sequence_images"] for i in images})
    assert used == list(range(batch["image_sizes"].shape[0]))  # every image is used, and stored once
    assert_rows_unchanged(dpo_rows, before)


def test_dpo_rows_see_their_images_through_sequence_images(tiny_model, tiny_processor, dpo_rows):
    """One vision pass, features routed by sequence_images == each sequence run alone with its own images."""
    batch = DPOCollator(pad_token_id=tiny_processor.tokenizer.pad_token_id)(dpo_rows)
    with torch.no_grad():
        features = tiny_model.model.vision_embed_tokens.per_image(batch["pixel_values"], batch["image_sizes"])
        routed = [features[i] for images in batch["sequence_images"] for i in images]
        logits = tiny_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=routed
        ).logits
        num_pairs = len(dpo_rows)
        for r in range(2 * num_pairs):
            row = dpo_rows[r % num_pairs]
            rejected = r >= num_pairs
            ids, _ = row["pair"].rejected_sequence() if rejected else row["pair"].chosen_sequence()
            own = rejected and row["pair"].has_rejected_images
            pixels = row["rejected_pixel_values"] if own else row["pixel_values"]
            sizes = row["rejected_image_sizes"] if own else row["image_sizes"]
            inputs = {"pixel_values": pixels, "image_sizes": sizes} if sizes.shape[0] else {}
            alone = tiny_model(input_ids=torch.tensor([ids]), **inputs).logits[0]
            assert torch.allclose(logits[r, : len(ids)], alone, atol=1e-5)


def test_dpo_image_contrast_rejected_prompt_has_its_own_slots(tiny_processor, dpo_rows):
    pair = dpo_rows[3]["pair"]
    slots = tiny_processor.image_token_id
    assert pair.prompt_ids.count(slots) == tiny_processor.num_image_tokens(40, 30)
    assert pair.rejected_prompt_ids.count(slots) == tiny_processor.num_image_tokens(30, 120)
    assert dpo_rows[0]["pair"].rejected_prompt_ids == dpo_rows[0]["pair"].prompt_ids
