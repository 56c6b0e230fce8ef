"""data/synthetic.py: TRL-format rows, answers true to the pictures, byte determinism, held-out images, caching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.images import DEFAULT_MAX_PIXELS, image_size, load_rgb
from data.sample import ImageRef, Origin
from data.synthetic import (
    ANSWERS,
    COLOURS,
    COUNT_WORDS,
    DEFAULT_IMAGE_SIZES,
    IMAGE_TASKS,
    QUESTIONS,
    SHAPES,
    SYSTEM_PROMPT,
    question_task,
    synthetic_texts,
    write_synthetic,
)

COUNTS = {"n_train": 40, "n_eval": 12, "n_pref_train": 20, "n_pref_eval": 10}
SPLIT_COUNTS = {"sft_train": 40, "sft_eval": 12, "pref_train": 20, "pref_eval": 10}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("synthetic") / "data", seed=3, **COUNTS)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _all_rows(paths) -> dict[str, list[dict]]:
    return {split: _rows(getattr(paths, split)) for split in SPLIT_COUNTS}


def _exchanges(row: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a row, the preference row's chosen answer as the last one."""
    messages = row["messages"] if "messages" in row else row["prompt"] + row["chosen"]
    questions = [_text(m) for m in messages if m["role"] == "user"]
    answers = [_text(m) for m in messages if m["role"] == "assistant"]
    return list(zip(questions, answers, strict=True))


def _text(message: dict) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def _image(paths, row: dict) -> Image.Image:
    (relative,) = row["images"]
    return Image.open(paths.root / relative).convert("RGB")


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---- format -----------------------------------------------------------------------------------------------------


def test_row_counts_files_and_manifest(dataset):
    rows = _all_rows(dataset)
    assert {split: len(split_rows) for split, split_rows in rows.items()} == SPLIT_COUNTS
    referenced = [name for split_rows in rows.values() for row in split_rows for name in row["images"]]
    on_disk = sorted(path.relative_to(dataset.root).as_posix() for path in dataset.images.iterdir())
    assert sorted(referenced) == on_disk and len(set(referenced)) == len(referenced)
    manifest = json.loads(dataset.manifest.read_text())
    assert manifest["seed"] == 3 and manifest["rows"] == SPLIT_COUNTS


def test_sft_rows_are_trl_conversations_with_one_image_slot_per_image(dataset):
    for split in ("sft_train", "sft_eval"):
        for row in _rows(getattr(dataset, split)):
            assert set(row) == {"messages", "images"}
            roles = [message["role"] for message in row["messages"]]
            body = roles[1:] if roles[0] == "system" else roles
            assert body == ["user", "assistant"] * (len(body) // 2) and body
            slots = [
                part for message in row["messages"] for part in message["content"] if part["type"] == "image"
            ]
            assert len(slots) == len(row["images"]) <= 1
            if row["images"]:
                assert row["messages"][roles.index("user")]["content"][0] == {"type": "image"}


def test_preference_rows_are_trl_preference_pairs(dataset):
    for split in ("pref_train", "pref_eval"):
        for row in _rows(getattr(dataset, split)):
            assert set(row) == {"prompt", "chosen", "rejected", "images"}
            assert row["prompt"][-1]["role"] == "user"
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
            assert _text(row["chosen"][0]) != _text(row["rejected"][0])


def test_text_only_rows_and_system_dialogues_are_present(dataset):
    for split, split_rows in _all_rows(dataset).items():
        assert any(not row["images"] for row in split_rows), split
        dialogues = [row for row in split_rows if len(_exchanges(row)) == 2]
        if SPLIT_COUNTS[split] >= 10:
            assert dialogues, split
        for row in dialogues:
            messages = row.get("messages", row.get("prompt"))
            assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}


def test_image_paths_are_relative_pngs_of_the_allowed_sizes(dataset):
    origin = Origin(dataset="synthetic", row=0)
    for split_rows in _all_rows(dataset).values():
        for row in split_rows:
            for relative in row["images"]:
                assert relative.startswith("images/") and relative.endswith(".png")
                ref = ImageRef(path=dataset.root / relative)
                assert image_size(ref, origin, "images[0]", DEFAULT_MAX_PIXELS) in DEFAULT_IMAGE_SIZES
                assert load_rgb(ref, origin, "images[0]", DEFAULT_MAX_PIXELS).mode == "RGB"


# ---- answers ----------------------------------------------------------------------------------------------------


def test_answers_and_rejected_answers_come_from_their_task_vocabulary(dataset):
    seen_tasks = set()
    for split_rows in _all_rows(dataset).values():
        for row in split_rows:
            for question, answer in _exchanges(row):
                task = question_task(question)
                seen_tasks.add(task)
                assert answer in ANSWERS[task], (question, answer)
            if "rejected" in row:
                question, answer = _exchanges(row)[-1]
                rejected = _text(row["rejected"][0])
                if question_task(question) == "text":  # the plausible mistake: the question's other word
                    assert rejected in SHAPES and rejected in question
                else:
                    assert rejected in ANSWERS[question_task(question)]
    assert seen_tasks == {*IMAGE_TASKS, "text"}


def test_question_task_rejects_unknown_questions():
    with pytest.raises(ValueError, match="not a question write_synthetic generates"):
        question_task("What is the weather?")


def test_every_generated_text_is_in_synthetic_texts(dataset):
    texts = set(synthetic_texts())
    for split_rows in _all_rows(dataset).values():
        for row in split_rows:
            for message in [
                *row.get("messages", []),
                *row.get("prompt", []),
                *row.get("chosen", []),
                *row.get("rejected", []),
            ]:
                assert message["role"] in texts
                assert _text(message) in texts


def _non_white_colours(image: Image.Image) -> set[tuple[int, int, int]]:
    pixels = np.asarray(image).reshape(-1, 3)
    return {tuple(int(v) for v in pixel) for pixel in np.unique(pixels, axis=0)} - {WHITE}


def _rows_of_task(dataset, task: str, splits=None) -> list[tuple[dict, str]]:
    return [
        (row, answer)
        for split, split_rows in _all_rows(dataset).items()
        if splits is None or split in splits
        for row in split_rows
        for question, answer in _exchanges(row)[:1]
        if question == QUESTIONS[task]
    ]


def _drawn_count(image: Image.Image) -> int:
    ink = np.any(np.asarray(image) != 255, axis=2)
    half_height, half_width = ink.shape[0] // 2, ink.shape[1] // 2
    quadrants = [
        ink[:half_height, :half_width],
        ink[:half_height, half_width:],
        ink[half_height:, :half_width],
        ink[half_height:, half_width:],
    ]
    return sum(bool(quadrant.any()) for quadrant in quadrants)


def test_colour_answers_match_the_single_drawn_shape(dataset):
    """Everywhere but sft_train, whose planted confusion the test below checks."""
    rows = _rows_of_task(dataset, "colour", splits=("sft_eval", "pref_train", "pref_eval"))
    assert rows
    for row, answer in rows:
        assert _non_white_colours(_image(dataset, row)) == {COLOURS[answer]}


def test_count_answers_match_the_occupied_quadrants(dataset):
    rows = _rows_of_task(dataset, "count")
    assert rows
    for row, answer in rows:
        assert _drawn_count(_image(dataset, row)) == COUNT_WORDS.index(answer) + 1


def test_sft_train_confuses_purple_with_blue_and_the_preference_pairs_reject_it(dataset):
    """The systematic error the demo's DPO stage is there to fix (data/synthetic.py docstring): every colour answer
    matches the drawing but sft_train's, where purple is written blue about half the time."""
    confused = right = 0
    for split, rows in _all_rows(dataset).items():
        for row in rows:
            for question, answer in _exchanges(row):
                if question != QUESTIONS["colour"]:
                    continue
                drawn = {
                    name for name, rgb in COLOURS.items() if rgb in _non_white_colours(_image(dataset, row))
                }
                if split == "sft_train" and drawn == {"purple"} and answer == "blue":
                    confused += 1
                else:
                    assert drawn == {answer}, (split, row)
                    right += split == "sft_train" and answer == "purple"
            if "rejected" in row and _exchanges(row)[-1] == (QUESTIONS["colour"], "purple"):
                assert _text(row["rejected"][0]) == "blue"
    assert confused > 0 and right > 0


def test_tallest_answer_is_the_colour_reaching_highest(dataset):
    rows = _rows_of_task(dataset, "tallest")
    assert rows
    for row, answer in rows:
        pixels = np.asarray(_image(dataset, row))
        bar = np.all(pixels == COLOURS[answer], axis=2)
        others = np.any(pixels != 255, axis=2) & ~bar & ~np.all(pixels == BLACK, axis=2)
        assert np.argmax(bar.any(axis=1)) < np.argmax(others.any(axis=1))


def test_number_images_hold_only_black_ink(dataset):
    rows = _rows_of_task(dataset, "number")
    assert rows
    for row, _ in rows:
        assert _non_white_colours(_image(dataset, row)) == {BLACK}


# ---- determinism, held-out images, caching ----------------------------------------------------------------------


def test_same_arguments_give_identical_bytes_and_another_seed_differs(tmp_path, dataset):
    again = write_synthetic(tmp_path / "again", seed=3, **COUNTS)
    assert _file_bytes(again.root) == _file_bytes(dataset.root)
    other = write_synthetic(tmp_path / "other", seed=4, **COUNTS)
    assert _file_bytes(other.root)["sft_train.jsonl"] != _file_bytes(dataset.root)["sft_train.jsonl"]


def test_no_image_repeats_so_eval_images_are_held_out(dataset):
    rows = _all_rows(dataset)

    def pixel_digests(splits):
        return [
            hashlib.sha256(_image(dataset, row).tobytes()).hexdigest()
            for split in splits
            for row in rows[split]
            if row["images"]
        ]

    train, held_out = pixel_digests(["sft_train", "pref_train"]), pixel_digests(["sft_eval", "pref_eval"])
    assert not set(train) & set(held_out)
    assert len(set(train + held_out)) == len(train + held_out)


def test_second_call_with_same_arguments_writes_nothing(tmp_path):
    paths = write_synthetic(tmp_path / "data", seed=0, **COUNTS)
    stamps = {path: path.stat().st_mtime_ns for path in paths.root.rglob("*")}
    (paths.root / "images" / "00000.png").write_bytes(b"left alone")
    assert write_synthetic(tmp_path / "data", seed=0, **COUNTS) == paths
    assert {path: path.stat().st_mtime_ns for path in paths.root.rglob("*") if path.name != "00000.png"} == {
        path: stamp for path, stamp in stamps.items() if path.name != "00000.png"
    }
    assert (paths.root / "images" / "00000.png").read_bytes() == b"left alone"


def test_changed_arguments_or_a_missing_file_regenerate(tmp_path):
    paths = write_synthetic(tmp_path / "data", seed=0, **COUNTS)
    fewer = write_synthetic(tmp_path / "data", seed=0, **{**COUNTS, "n_train": 5})
    assert len(_rows(fewer.sft_train)) == 5
    assert len(list(fewer.images.iterdir())) == sum(
        bool(r["images"]) for rows in _all_rows(fewer).values() for r in rows
    )
    paths.pref_eval.unlink()
    write_synthetic(tmp_path / "data", seed=0, **{**COUNTS, "n_train": 5})
    assert len(_rows(paths.pref_eval)) == COUNTS["n_pref_eval"]


def test_empty_directory_is_used_and_foreign_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (
        len(
            _rows(
                write_synthetic(
                    tmp_path / "empty", n_train=3, n_eval=1, n_pref_train=1, n_pref_eval=1
                ).sft_train
            )
        )
        == 3
    )
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds files that write_synthetic did not write"):
        write_synthetic(foreign, n_train=3, n_eval=1, n_pref_train=1, n_pref_eval=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_zero_rows_give_empty_files(tmp_path):
    paths = write_synthetic(tmp_path / "none", n_train=0, n_eval=0, n_pref_train=0, n_pref_eval=0)
    assert paths.sft_train.read_text() == "" and not any(paths.images.iterdir())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_train": -1}, "n_train must be an int >= 0"),
        ({"n_eval": 2.0}, "n_eval must be an int >= 0"),
        ({"seed": "0"}, "seed must be an int"),
        ({"image_sizes": ()}, "at least one"),
        ({"image_sizes": ((16, 64),)}, r"\(16, 64\) must be"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path / "bad", **{**COUNTS, **arguments})
    assert not (tmp_path / "bad").exists()
