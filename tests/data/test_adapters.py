"""Dataset adapters (one raw row -> one canonical sample) and sources (files -> samples, weighted mixtures)."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from config import Source as SourceSpec
from data.adapters import (
    adapt_llava,
    adapt_rlaif_v,
    adapt_row,
    adapt_sharegpt,
    adapt_trl_messages,
    adapt_trl_preference,
    adapt_vqa,
    apply_columns,
    vqa_references,
)
from data.sample import DataError, ImagePart, ImageRef, Origin, PreferenceSample, SFTSample, TextPart, Turn
from data.sources import SkipCounter, apportion, iter_samples, mix

ORIGIN = Origin(dataset="fixture", row=7)


@pytest.fixture(autouse=True)
def _offline_datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of non-streaming loads inside the test's tmp_path, and never reach the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_png(path: Path, size: tuple[int, int] = (4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path) -> Path:
    """An image root with two images."""
    write_png(tmp_path / "images" / "a.png")
    write_png(tmp_path / "images" / "sub" / "b.png")
    return tmp_path / "images"


def user(*parts):
    return Turn(role="user", parts=tuple(parts))


def assistant(text):
    return Turn(role="assistant", parts=(TextPart(text),))


# ------------------------------------------------------------------------------------------- SFT adapters


def test_trl_messages_parts_and_strings(root):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  What is this?  "}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
            {"role": "assistant", "content": "Another."},
        ],
        "images": ["a.png", "sub/b.png"],
    }
    sample = adapt_trl_messages(row, origin=ORIGIN, image_root=root)
    assert sample == SFTSample(
        turns=(
            Turn(role="system", parts=(TextPart("Be brief."),)),
            user(ImagePart(), TextPart("  What is this?  ")),  # user text kept verbatim
            assistant("A square."),
            user(TextPart("And this?"), ImagePart()),
            assistant("Another."),
        ),
        images=(ImageRef(path=(root / "a.png").resolve()), ImageRef(path=(root / "sub" / "b.png").resolve())),
        origin=ORIGIN,
    )


def llava_instruct_mix_row(image: dict) -> dict:
    """A row as HF datasets returns HuggingFaceH4/llava-instruct-mix-vsft: every part carries index/text/type."""
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"index": 0, "text": None, "type": "image"},
                    {"index": None, "text": "\nWhat is shown?", "type": "text"},
                ],
            },
            {"role": "assistant", "content": [{"index": None, "text": "A red square.", "type": "text"}]},
        ],
        "images": [image],
    }


@pytest.mark.parametrize("extra_part_keys", [{}, {"image": None}])
def test_trl_messages_tolerates_none_filled_struct_parts(extra_part_keys):
    data = png_bytes()
    row = llava_instruct_mix_row({"bytes": data, "path": None})
    for message in row["messages"]:
        message["content"] = [{**part, **extra_part_keys} for part in message["content"]]
    sample = adapt_trl_messages(row, origin=ORIGIN, image_root=None)
    assert sample.turns == (user(ImagePart(), TextPart("\nWhat is shown?")), assistant("A red square."))
    assert sample.images == (ImageRef(data=data),)


def test_llava_instruct_mix_parquet_through_datasets(tmp_path):
    """The same rows written with the hub dataset's features and read back by `datasets` (None-filled by arrow)."""
    part = {
        "index": datasets.Value("int64"),
        "text": datasets.Value("string"),
        "type": datasets.Value("string"),
    }
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
            "images": datasets.List(datasets.Image()),
        }
    )
    rows = [llava_instruct_mix_row({"bytes": png_bytes(), "path": None}) for _ in range(3)]
    datasets.Dataset.from_list(rows, features=features).to_parquet(tmp_path / "mix.parquet")
    samples = list(iter_samples(SourceSpec(format="trl_messages", path=str(tmp_path / "mix.parquet"))))
    assert [s.origin.row for s in samples] == [0, 1, 2]
    assert samples[0].turns[0] == user(ImagePart(), TextPart("\nWhat is shown?"))
    assert samples[0].images == (ImageRef(data=png_bytes()),)


def test_llava_tags_single_and_list_images_and_text_only(root):
    row = {
        "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Red."}],
        "image": "a.png",
    }
    sample = adapt_llava(row, origin=ORIGIN, image_root=root)
    assert sample.turns == (user(ImagePart(), TextPart("\nDescribe.")), assistant("Red."))
    assert sample.images == (ImageRef(path=(root / "a.png").resolve()),)

    row = {
        "conversations": [
            {"from": "system", "value": "Sys."},
            {"from": "human", "value": "<image><image>Same?"},
            {"from": "gpt", "value": "No."},
        ],
        "image": ["a.png", "sub/b.png"],
    }
    sample = adapt_llava(row, origin=ORIGIN, image_root=root)
    assert sample.turns[1] == user(ImagePart(), ImagePart(), TextPart("Same?"))
    assert len(sample.images) == 2

    text_only = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert adapt_llava(text_only, origin=ORIGIN, image_root=None).images == ()


def test_sharegpt_accepts_both_role_vocabularies(root):
    row = {
        "conversations": [
            {"from": "user", "value": "Look <image> here"},
            {"from": "gpt", "value": "Ok."},
            {"from": "human", "value": "More?"},
            {"from": "assistant", "value": "Done."},
        ],
        "images": ["a.png"],
    }
    sample = adapt_sharegpt(row, origin=ORIGIN, image_root=root)
    assert [t.role for t in sample.turns] == ["user", "assistant", "user", "assistant"]
    assert sample.turns[0].parts == (TextPart("Look "), ImagePart(), TextPart(" here"))


@pytest.mark.parametrize(
    ("row", "answer", "references"),
    [
        ({"image": "a.png", "query": "Max?", "label": ["42"]}, "42", ["42"]),  # ChartQA, list label
        ({"image": "a.png", "query": "Max?", "label": "42"}, "42", ["42"]),  # ChartQA, string label
        ({"image": "a.png", "question": "Who?", "answers": ["Ann", "ann"]}, "Ann", ["Ann", "ann"]),  # DocVQA
    ],
)
def test_vqa_trains_on_first_answer_and_keeps_all_for_eval(root, row, answer, references):
    sample = adapt_vqa(row, origin=ORIGIN, image_root=root)
    question = row.get("query") or row["question"]
    assert sample.turns == (user(ImagePart(), TextPart(question)), assistant(answer))
    assert sample.images == (ImageRef(path=(root / "a.png").resolve()),)
    assert vqa_references(row, {}, origin=ORIGIN) == references


def test_vqa_references_apply_renames():
    row = {"image": "a.png", "q": "Max?", "gold": ["1", "one"]}
    assert vqa_references(row, {"q": "question", "gold": "answers"}, origin=ORIGIN) == ["1", "one"]


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        (
            {"image": "a.png", "question": "Q", "query": "Q", "answers": ["A"]},
            "question/query",
            "ambiguous column",
        ),
        ({"image": "a.png", "answers": ["A"]}, "question/query", "missing column"),
        ({"image": "a.png", "question": "Q", "answers": []}, "answers", "no answers"),
        ({"image": "a.png", "question": "Q", "answers": None}, "answers", "no answers"),
        ({"image": "a.png", "question": "Q", "answers": [" ", "A"]}, "answers[0]", "empty assistant turn"),
        ({"image": "a.png", "question": "Q", "answers": ["A", 3]}, "answers[1]", "bad text type"),
        ({"question": "Q", "answers": ["A"]}, "image", "missing column"),
    ],
)
def test_vqa_bad_rows(root, row, field, reason):
    with pytest.raises(DataError) as caught:
        adapt_vqa(row, origin=ORIGIN, image_root=root)
    assert (caught.value.field, caught.value.problem.partition(":")[0]) == (field, reason)


# ------------------------------------------------------------------------------------------- preference


def test_trl_preference_messages_strings_and_rejected_images(root):
    row = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        "rejected": "Blue.",
        "images": ["a.png"],
        "rejected_images": ["sub/b.png"],
    }
    sample = adapt_trl_preference(row, origin=ORIGIN, image_root=root)
    assert sample == PreferenceSample(
        prompt=(user(ImagePart(), TextPart("Color?")),),
        chosen=assistant("Red."),
        rejected=assistant("Blue."),
        images=(ImageRef(path=(root / "a.png").resolve()),),
        origin=ORIGIN,
        rejected_images=(ImageRef(path=(root / "sub" / "b.png").resolve()),),
    )
    text_only = adapt_trl_preference(
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, origin=ORIGIN, image_root=None
    )
    assert text_only.prompt == (user(TextPart("Hi?")),) and text_only.rejected_images is None


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        (
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "chosen",
            "bad completion",
        ),
        ({"chosen": [{"role": "user", "content": "Red."}]}, "chosen[0].role", "roles out of order"),
        ({"rejected": ""}, "rejected", "empty assistant turn"),
        (
            {
                "rejected": [
                    {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
                ]
            },
            "rejected",
            "image in completion",
        ),
        (
            {
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "prompt[1].role",
            "roles out of order",
        ),
        ({"rejected_images": ["a.png", "a.png"]}, "rejected_images", "image count mismatch"),
        ({"images": []}, "images", "image count mismatch"),
    ],
)
def test_trl_preference_bad_rows(root, changes, field, reason):
    row = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}],
        "chosen": "Red.",
        "rejected": "Blue.",
        "images": ["a.png"],
    }
    with pytest.raises(DataError) as caught:
        adapt_trl_preference({**row, **changes}, origin=ORIGIN, image_root=root)
    assert (caught.value.field, caught.value.problem.partition(":")[0]) == (field, reason)


def test_rlaif_v(root):
    data = png_bytes()
    row = {
        "image": {"bytes": data, "path": "x.jpg"},
        "question": "What?",
        "chosen": "A cat.",
        "rejected": "A dog.",
    }
    sample = adapt_rlaif_v(row, origin=ORIGIN, image_root=root)
    assert sample.prompt == (user(ImagePart(), TextPart("What?")),)
    assert (sample.chosen, sample.rejected, sample.images) == (
        assistant("A cat."),
        assistant("A dog."),
        (ImageRef(data=data),),
    )
    with pytest.raises(DataError, match="field 'rejected': empty assistant turn"):
        adapt_rlaif_v({**row, "rejected": " "}, origin=ORIGIN, image_root=root)


# ------------------------------------------------------------------------------------------- bad rows


def trl_row(*messages, images=()):
    return {"messages": list(messages), "images": list(images)}


U = {"role": "user", "content": "Q"}
A = {"role": "assistant", "content": "A"}
S = {"role": "system", "content": "S"}


@pytest.mark.parametrize(
    ("adapter", "row", "field", "reason"),
    [
        (adapt_trl_messages, trl_row(A, U), "messages[0].role", "roles out of order"),
        (adapt_trl_messages, trl_row(U, U, A), "messages[1].role", "roles out of order"),
        (adapt_trl_messages, trl_row(U, A, S, U, A), "messages[2].role", "roles out of order"),
        (
            adapt_trl_messages,
            trl_row(S, U),
            "messages[1].role",
            "roles out of order",
        ),  # must end with assistant
        (adapt_trl_messages, trl_row(S), "messages[0].role", "roles out of order"),
        (adapt_trl_messages, trl_row(), "messages", "empty conversation"),
        (
            adapt_trl_messages,
            trl_row(U, {"role": "assistant", "content": ""}),
            "messages[1]",
            "empty assistant turn",
        ),
        (
            adapt_trl_messages,
            trl_row(U, {"role": "assistant", "content": [{"type": "text", "text": " \n"}]}),
            "messages[1]",
            "empty assistant turn",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": 5}, A),
            "messages[0].content",
            "bad content type",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": {"text": "Q"}}, A),
            "messages[0].content",
            "bad content type",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": [{"type": "text", "text": None}]}, A),
            "messages[0].content[0].text",
            "bad text type",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": ["Q"]}, A),
            "messages[0].content[0]",
            "bad content part",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": [{"type": "video"}]}, A),
            "messages[0].content[0].type",
            "unsupported part type",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": [{"type": "image", "image": "a.png"}]}, A, images=["a.png"]),
            "messages[0].content[0].image",
            "unsupported part field",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": [{"type": "image", "index": 1}]}, A, images=["a.png"]),
            "messages[0].content[0].index",
            "image index out of order",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "tool", "content": "Q"}, A),
            "messages[0].role",
            "unknown role",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": ["user"], "content": "Q"}, A),
            "messages[0].role",
            "unknown role",
        ),
        (
            adapt_trl_messages,
            trl_row({"role": "user", "content": [{"type": "image"}]}, A),
            "images",
            "image count mismatch",
        ),
        (adapt_trl_messages, trl_row(U, A, images=["a.png"]), "images", "image count mismatch"),
        (adapt_trl_messages, {"messages": [U, A], "images": "a.png"}, "images", "bad images type"),
        (adapt_trl_messages, {"images": []}, "messages", "missing column"),
        (
            adapt_llava,
            {"conversations": [{"from": "user", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "conversations[0].from",
            "unknown role",
        ),
        (
            adapt_llava,
            {"conversations": [{"from": "human", "value": ["Q"]}, {"from": "gpt", "value": "A"}]},
            "conversations[0].value",
            "bad content type",
        ),
        (
            adapt_llava,
            {
                "conversations": [
                    {"from": "human", "value": "<image><image>Q"},
                    {"from": "gpt", "value": "A"},
                ],
                "image": "a.png",
            },
            "image",
            "image count mismatch",
        ),
        (
            adapt_llava,
            {
                "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>Q"}],
                "image": "a.png",
            },
            "conversations[0].from",
            "roles out of order",
        ),
        (
            adapt_sharegpt,
            {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
            "images",
            "image count mismatch",
        ),
        (
            adapt_sharegpt,
            {"conversations": [{"from": "observation", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "conversations[0].from",
            "unknown role",
        ),
        (adapt_sharegpt, {"conversations": ["Q", "A"]}, "conversations[0]", "bad message"),
    ],
)
def test_bad_rows_name_field_and_reason(root, adapter, row, field, reason):
    with pytest.raises(DataError) as caught:
        adapter(row, origin=ORIGIN, image_root=root)
    assert (caught.value.field, caught.value.problem.partition(":")[0]) == (field, reason)
    assert str(caught.value).startswith(f"fixture row 7, field '{field}': {reason}")


def test_image_tags_in_trl_string_content_get_a_hint(root):
    row = trl_row({"role": "user", "content": "<image>\nWhat?"}, A, images=["a.png"])
    with pytest.raises(DataError, match="use format 'sharegpt'/'llava'"):
        adapt_trl_messages(row, origin=ORIGIN, image_root=root)


def test_swapped_roles_after_assistant_end_are_an_error():
    # The second message answers before it is asked: the order check names the exact message.
    row = {
        "conversations": [
            {"from": "human", "value": "Q"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A"},
        ]
    }
    with pytest.raises(
        DataError, match=r"field 'conversations\[1\]\.from': roles out of order: expected 'assistant'"
    ):
        adapt_llava(row, origin=ORIGIN, image_root=None)


# ------------------------------------------------------------------------------------------- image paths


def escaping_paths(root: Path) -> dict[str, str]:
    outside = write_png(root.parent / "outside.png")
    (root / "link.png").symlink_to(outside)
    (root / "linkdir").symlink_to(root.parent, target_is_directory=True)
    return {
        "absolute": str(outside),
        "dotdot": "../outside.png",
        "nested dotdot": "sub/../../outside.png",
        "symlink": "link.png",
        "symlinked folder": "linkdir/outside.png",
    }


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested dotdot", "symlink", "symlinked folder"])
def test_image_paths_must_stay_inside_the_root(root, kind):
    path = escaping_paths(root)[kind]
    row = {
        "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
        "image": path,
    }
    with pytest.raises(DataError) as caught:
        adapt_llava(row, origin=ORIGIN, image_root=root)
    assert caught.value.problem.startswith("image path escapes image_root")
    assert str(caught.value).startswith("fixture row 7, field 'image[0]'")


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_escaping_path_inside_an_image_dict_is_rejected(root, kind):
    path = escaping_paths(root)[kind]
    row = trl_row({"role": "user", "content": [{"type": "image"}]}, A, images=[{"bytes": None, "path": path}])
    with pytest.raises(DataError, match=r"field 'images\[0\]\.path': image path escapes image_root"):
        adapt_trl_messages(row, origin=ORIGIN, image_root=root)


def test_paths_inside_the_root_resolve(root):
    (root / "inner_link.png").symlink_to(root / "a.png")
    row = trl_row(
        {"role": "user", "content": [{"type": "image"}] * 3},
        A,
        images=["inner_link.png", "sub/../a.png", str(root / "sub" / "b.png")],
    )
    images = adapt_trl_messages(row, origin=ORIGIN, image_root=root).images
    assert [ref.path for ref in images] == [
        (root / "a.png").resolve(),
        (root / "a.png").resolve(),
        (root / "sub" / "b.png").resolve(),
    ]


@pytest.mark.parametrize(
    ("image", "image_root", "field", "reason"),
    [
        ("missing.png", "root", "images[0]", "image file not found"),
        ("sub", "root", "images[0]", "unreadable image path"),  # a folder: named as one
        ("a.png", None, "images[0]", "no image root"),
        ("hf://datasets/owner/name@main/a.png", None, "images[0]", "remote image path"),
        (b"", "root", "images[0]", "bad image"),
        ({"bytes": None, "path": None}, "root", "images[0]", "bad image"),
        (123, "root", "images[0]", "bad image"),
    ],
)
def test_bad_image_values(root, image, image_root, field, reason):
    row = trl_row({"role": "user", "content": [{"type": "image"}]}, A, images=[image])
    with pytest.raises(DataError) as caught:
        adapt_trl_messages(row, origin=ORIGIN, image_root=root if image_root else None)
    assert (caught.value.field, caught.value.problem.partition(":")[0]) == (field, reason)


# ------------------------------------------------------------------------------------------- columns


def test_apply_columns_renames_and_reports_missing_or_colliding_columns():
    row = {"q": "Q", "a": ["A"], "image": "x.png"}
    assert apply_columns(row, {"q": "question", "a": "answers"}, origin=ORIGIN) == {
        "question": "Q",
        "answers": ["A"],
        "image": "x.png",
    }
    with pytest.raises(DataError, match="field 'query': missing column"):
        apply_columns(row, {"query": "question"}, origin=ORIGIN)
    with pytest.raises(DataError, match="field 'image': column collision"):
        apply_columns(row, {"q": "image"}, origin=ORIGIN)
    assert apply_columns(row, {"image": "img", "q": "image"}, origin=ORIGIN)["image"] == "Q"


def test_adapt_row_renames_then_adapts(root):
    row = {"img": "a.png", "prompt_text": "Max?", "gold": "3"}
    sample = adapt_row(
        row,
        format="vqa",
        columns={"img": "image", "prompt_text": "question", "gold": "answers"},
        origin=ORIGIN,
        image_root=root,
    )
    assert sample.turns[1] == assistant("3")
    with pytest.raises(ValueError, match="unknown format 'vqa2'"):
        adapt_row(row, format="vqa2", columns={}, origin=ORIGIN, image_root=root)


# ------------------------------------------------------------------------------------------- sources: files


VQA_ROWS = [{"image": "a.png", "question": f"Q{i}", "answers": [f"A{i}", "other"]} for i in range(4)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("streaming", [False, True])
def test_local_files_resolve_images_next_to_the_file(root, suffix, streaming):
    path = write_rows(root / f"rows{suffix}", VQA_ROWS)
    samples = list(iter_samples(SourceSpec(format="vqa", path=str(path), streaming=streaming)))
    assert [s.turns[1] for s in samples] == [assistant(f"A{i}") for i in range(4)]
    assert [s.origin for s in samples] == [Origin(dataset=f"{path}:train", row=i) for i in range(4)]
    assert {s.images for s in samples} == {(ImageRef(path=(root / "a.png").resolve()),)}


def test_arrow_file_with_image_feature_gives_bytes(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
        }
    )
    rows = [{"image": {"bytes": png_bytes(), "path": None}, "question": "Q", "chosen": "C", "rejected": "R"}]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(tmp_path / "saved")
    (arrow_file,) = (tmp_path / "saved").glob("*.arrow")
    (sample,) = iter_samples(SourceSpec(format="rlaif_v", path=str(arrow_file)))
    assert isinstance(sample, PreferenceSample) and sample.images == (ImageRef(data=png_bytes()),)


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_with_metadata(tmp_path, metadata):
    folder = tmp_path / "folder"
    for name in ("x.png", "y.png"):
        write_png(folder / name)
    rows = [
        {"file_name": "x.png", "question": "Qx", "answers": "Ax"},
        {"file_name": "y.png", "question": "Qy", "answers": "Ay"},
    ]
    if metadata == "metadata.jsonl":
        (folder / metadata).write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        (folder / metadata).write_text(
            "file_name,question,answers\n"
            + "".join(f"{r['file_name']},{r['question']},{r['answers']}\n" for r in rows)
        )
    samples = sorted(iter_samples(SourceSpec(format="vqa", path=str(folder))), key=lambda s: s.turns[1].text)
    assert [(s.turns[0].text, s.turns[1].text) for s in samples] == [("Qx", "Ax"), ("Qy", "Ay")]
    assert [s.images for s in samples] == [
        (ImageRef(path=(folder / "x.png").resolve()),),
        (ImageRef(path=(folder / "y.png").resolve()),),
    ]


def test_imagefolder_with_several_images_per_row(tmp_path):
    folder = tmp_path / "folder"
    write_png(folder / "x.png"), write_png(folder / "y.png")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
    ]
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_names": ["y.png", "x.png"], "messages": messages})
    )
    (sample,) = iter_samples(SourceSpec(format="trl_messages", path=str(folder)))
    assert sample.images == (
        ImageRef(path=(folder / "y.png").resolve()),
        ImageRef(path=(folder / "x.png").resolve()),
    )
    assert sample.turns[0] == user(ImagePart(), ImagePart(), TextPart("Same?"))


@pytest.mark.parametrize("streaming", [False, True])
def test_mixed_content_types_in_json_arrive_unchanged(tmp_path, streaming):
    """`datasets` stores a column that is sometimes a string, sometimes a list as JSON text; it must come back."""
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"},
        ]
    }
    path = write_rows(tmp_path / "mixed.jsonl", [row, row])
    samples = list(iter_samples(SourceSpec(format="trl_messages", path=str(path), streaming=streaming)))
    assert [t.parts for t in samples[1].turns] == [
        (TextPart("Be brief."),),
        (TextPart("Q"),),
        (TextPart("A"),),
    ]


def test_image_root_confines_paths_read_from_files(tmp_path, root):
    # The data file lives outside the image folder; image_root points at the folder, so '../' escapes are caught.
    path = write_rows(
        tmp_path / "data" / "rows.jsonl", [VQA_ROWS[0], {**VQA_ROWS[1], "image": "../outside.png"}]
    )
    write_png(tmp_path / "outside.png")
    source = SourceSpec(format="vqa", path=str(path), image_root=str(root))
    with pytest.raises(
        DataError, match=r"rows.jsonl:train row 1, field 'image': image path escapes image_root"
    ):
        list(iter_samples(source))


def test_columns_limit_and_config_fields_of_a_source(root):
    rows = [{"img": "a.png", "q": f"Q{i}", "gold": [f"A{i}"]} for i in range(5)]
    path = write_rows(root / "renamed.jsonl", rows)
    source = SourceSpec(
        format="vqa", path=str(path), columns={"img": "image", "q": "question", "gold": "answers"}, limit=3
    )
    assert [s.turns[0].text for s in iter_samples(source)] == ["Q0", "Q1", "Q2"]


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        list(iter_samples(SourceSpec(format="vqa", path=str(tmp_path / "absent.jsonl"))))
    with pytest.raises(ValueError, match="no such folder"):
        list(iter_samples(SourceSpec(format="vqa", path=str(tmp_path / "absent_folder"))))
    with pytest.raises(ValueError, match="unknown format 'chartqa'"):
        iter_samples(SourceSpec(format="chartqa", path=str(tmp_path / "x.jsonl")))
    with pytest.raises(ValueError, match="needs a SkipCounter"):
        iter_samples(SourceSpec(format="vqa", path="x.jsonl"), on_bad_sample="skip")
    with pytest.raises(ValueError, match="choose 'error' or 'skip'"):
        iter_samples(SourceSpec(format="vqa", path="x.jsonl"), on_bad_sample="drop")


# ------------------------------------------------------------------------------------------- sources: skips


def test_bad_rows_are_skipped_counted_and_logged(root, caplog):
    rows = [
        VQA_ROWS[0],
        {**VQA_ROWS[1], "answers": []},
        {**VQA_ROWS[2], "image": "../escape.png"},
        {**VQA_ROWS[3], "answers": []},
        VQA_ROWS[0],
    ]
    path = write_rows(root / "mixed.jsonl", rows)
    source = SourceSpec(format="vqa", path=str(path))
    with pytest.raises(DataError, match=r"mixed.jsonl:train row 1, field 'answers': no answers"):
        list(iter_samples(source))

    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="data.sources"):
        kept = list(iter_samples(source, on_bad_sample="skip", skip_counter=skips))
    assert [s.origin.row for s in kept] == [0, 4]
    name = f"{path}:train"
    assert skips.counts() == {name: {"image path escapes image_root": 1, "no answers": 2}}
    assert skips.total == 3
    assert skips.summary() == f"{name}: 3 rows skipped (image path escapes image_root: 1, no answers: 2)"
    # One warning per reason; the repeat of a reason goes to debug.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

    list(iter_samples(source, on_bad_sample="skip", skip_counter=skips))
    assert skips.total == 3  # reading the source again does not count its rows twice


def test_a_source_with_only_bad_rows_fails_even_when_skipping(root):
    path = write_rows(root / "bad.jsonl", [{**row, "answers": []} for row in VQA_ROWS])
    with pytest.raises(ValueError, match="all 4 rows are bad"):
        list(
            iter_samples(
                SourceSpec(format="vqa", path=str(path)), on_bad_sample="skip", skip_counter=SkipCounter()
            )
        )
    assert SkipCounter().summary() == "no rows skipped"


# ------------------------------------------------------------------------------------------- mixture


def test_apportion_is_exact_and_proportional():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(7, [3, 1]) == [5, 2]
    assert apportion(1000, [0.5, 0.25, 0.25]) == [500, 250, 250]
    assert sum(apportion(997, [0.3, 1.7, 2.9])) == 997


def test_mix_proportions_determinism_and_upsampling():
    small, large = [f"s{i}" for i in range(3)], [f"l{i}" for i in range(100)]
    mixed = list(mix([small, large], [1.0, 3.0], seed=0, num_samples=40))
    assert len(mixed) == 40
    assert Counter(item[0] for item in mixed) == {"s": 10, "l": 30}
    # The small stream is read again from its start to fill its quota of 10 from 3 items, in its own order.
    assert [item for item in mixed if item[0] == "s"] == (small * 4)[:10]
    assert [item for item in mixed if item[0] == "l"] == large[:30]
    assert mixed == list(mix([small, large], [1.0, 3.0], seed=0, num_samples=40))
    assert mixed != list(mix([small, large], [1.0, 3.0], seed=1, num_samples=40))
    # Interleaved, not blocked: both streams appear in the first quarter.
    assert {item[0] for item in mixed[:10]} == {"s", "l"}


def test_mix_rejects_bad_arguments_and_one_shot_iterators():
    with pytest.raises(ValueError, match="one weight per stream"):
        mix([[1]], [1.0, 2.0], seed=0, num_samples=1)
    with pytest.raises(ValueError, match="weight 1 is 0"):
        mix([[1], [2]], [1.0, 0], seed=0, num_samples=1)
    with pytest.raises(ValueError, match="positive integer"):
        mix([[1]], [1.0], seed=0, num_samples=0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        list(mix([iter([1, 2])], [1.0], seed=0, num_samples=3))


def test_training_mixes_sources_by_weight_and_keeps_origins(root):
    from config import DataSection
    from data.loaders import load_samples

    chart = write_rows(
        root / "chart.jsonl", [{"image": "a.png", "query": f"C{i}", "label": "c"} for i in range(6)]
    )
    doc = write_rows(
        root / "doc.json", [{"image": "a.png", "question": f"D{i}", "answers": ["d"]} for i in range(2)]
    )
    sources = (
        SourceSpec(format="vqa", path=str(chart), weight=1.0),
        SourceSpec(format="vqa", path=str(doc), weight=1.0),
    )
    mixed = load_samples(sources, "sft", DataSection(), seed=3, skips=SkipCounter())
    assert Counter(s.origin.dataset for s in mixed) == {f"{chart}:train": 4, f"{doc}:train": 4}
    doc_samples = [s for s in mixed if s.origin.dataset == f"{doc}:train"]
    assert [s.origin.row for s in doc_samples] == [0, 1, 0, 1]  # upsampled: read twice
    assert [s.turns[0].text for s in doc_samples] == ["D0", "D1", "D0", "D1"]
    assert mixed == list(
        mix([list(iter_samples(source)) for source in sources], [1.0, 1.0], seed=3, num_samples=8)
    )
    with pytest.raises(ValueError, match="unknown format"):
        list(iter_samples(SourceSpec(format="?", path=str(doc))))


def test_preference_row_with_identical_chosen_and_rejected_is_refused_or_counted(tmp_path):
    from data.adapters import adapt_row
    from data.sample import DataError, Origin

    row = {
        "image": {"bytes": png_bytes(), "path": None},
        "question": "What colour?",
        "chosen": "red",
        "rejected": "red",
    }
    with pytest.raises(DataError, match=r"row 3, field 'rejected': identical completions"):
        adapt_row(row, format="rlaif_v", columns={}, origin=Origin("pairs", 3), image_root=None)


def test_preference_row_with_missing_image_is_refused(tmp_path):
    from data.adapters import adapt_row
    from data.sample import DataError, Origin

    row = {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
        "chosen": "a",
        "rejected": "b",
        "images": ["missing.png"],
    }
    with pytest.raises(DataError, match="row 0, field 'images"):
        adapt_row(row, format="trl_preference", columns={}, origin=Origin("pairs", 0), image_root=tmp_path)
