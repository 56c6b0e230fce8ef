"""The rules every canonical conversation obeys, in one place: the adapters check them on each raw row (errors name
the row's own field names), and rendering checks them again on samples built in code (eval tasks, tests).

A conversation: an optional leading system turn, then user and assistant alternating from user, ending with
`final_role` ('assistant' for SFT, 'user' for a preference prompt); no empty assistant turn and no image in one;
no text that the processor would read as an image (`<|image|>`, `<|image_N|>`); one image per image part.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.sample import DataError, Origin, Role, Turn
from models.phi3v.configuration import IMAGE_TOKEN
from models.phi3v.processing import IMAGE_TAG as PROCESSOR_IMAGE_TAG

TAG_TEXT = "<image>"  # LLaVA/ShareGPT's image tag, which formats with image parts keep as plain text


def problem(origin: Origin, field: str, reason: str, detail: str) -> DataError:
    """`"<reason>: <detail>"`; the reason is a short fixed phrase under which skipped rows are counted."""
    return DataError(origin, field, f"{reason}: {detail}")


def is_empty(turn: Turn) -> bool:
    return turn.num_images == 0 and turn.text.strip() == ""


def check_text(turn: Turn, origin: Origin, field: str) -> None:
    """A turn's text must not hold what the processor reads as an image: `<|image|>` or an `<|image_N|>` tag."""
    text = turn.text
    if IMAGE_TOKEN in text:
        raise problem(
            origin,
            field,
            "literal image token",
            f"the text holds {IMAGE_TOKEN}, which the model would read "
            "as an image slot with no image behind it. Fix: mark images with image parts, or remove the "
            "token from the text",
        )
    tag = PROCESSOR_IMAGE_TAG.search(text)
    if tag:
        raise problem(
            origin,
            field,
            "literal image tag",
            f"the text holds '{tag.group(0)}', which the processor "
            "reads as an image reference. Fix: mark images with image parts, or remove the tag from the text",
        )


def check_completion(turn: Turn, origin: Origin, field: str) -> None:
    """A preference completion: one non-empty assistant turn of clean text, no image."""
    if turn.role != "assistant":
        raise problem(
            origin, field, "roles out of order", f"a completion must be an assistant turn, got '{turn.role}'"
        )
    if is_empty(turn):
        raise problem(origin, field, "empty assistant turn", "the completion has no text")
    if turn.num_images:
        raise problem(
            origin,
            field,
            "image in completion",
            "chosen and rejected completions are text; put the images in the prompt",
        )
    check_text(turn, origin, field)


def _check_role_order(
    turns: Sequence[Turn], *, final_role: Role, role_key: str, origin: Origin, field: str
) -> None:
    start = 1 if turns[0].role == "system" else 0
    for i in range(start, len(turns)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turns[i].role != expected:
            raise problem(
                origin,
                f"{field}[{i}].{role_key}",
                "roles out of order",
                f"expected '{expected}', got '{turns[i].role}' (an optional leading system turn, then user "
                "and assistant alternating, starting with user)",
            )
    if turns[-1].role != final_role:
        raise problem(
            origin,
            f"{field}[{len(turns) - 1}].{role_key}",
            "roles out of order",
            f"the conversation must end with a '{final_role}' turn, got '{turns[-1].role}'",
        )


def _check_image_count(
    turns: Sequence[Turn], *, num_images: int, images_field: str, origin: Origin, field: str
) -> None:
    num_slots = sum(t.num_images for t in turns)
    if num_slots == num_images:
        return
    hint = ""
    if num_slots == 0 and any(TAG_TEXT in t.text for t in turns):
        hint = (
            f"; the text holds '{TAG_TEXT}' tags, which this format keeps as text: mark images with "
            "{'type': 'image'} parts, or use format 'sharegpt'/'llava' for tag-marked text"
        )
    raise problem(
        origin,
        images_field,
        "image count mismatch",
        f"'{field}' has {num_slots} image slot(s) but '{images_field}' has {num_images} image(s){hint}",
    )


def validate_conversation(
    turns: Sequence[Turn],
    *,
    num_images: int,
    images_field: str,
    origin: Origin,
    field: str,
    final_role: Role = "assistant",
    role_key: str = "role",
) -> None:
    """Every rule of the module docstring; errors name `field[i].role_key` as the raw row spells it."""
    if not turns:
        raise problem(origin, field, "empty conversation", "there are no turns")
    _check_role_order(turns, final_role=final_role, role_key=role_key, origin=origin, field=field)
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and is_empty(turn):
            raise problem(
                origin, f"{field}[{i}]", "empty assistant turn", "an assistant turn has no text to learn"
            )
        if turn.role == "assistant" and turn.num_images:
            raise problem(
                origin,
                f"{field}[{i}]",
                "image in an assistant turn",
                "the model reads images but cannot "
                "write them, and the answer's image slots would have no label. Fix: move the image into the "
                "user turn",
            )
        check_text(turn, origin, f"{field}[{i}]")
    _check_image_count(turns, num_images=num_images, images_field=images_field, origin=origin, field=field)
