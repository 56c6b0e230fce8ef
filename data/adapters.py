"""Dataset adapters: one short validating function per input format, each turning one raw row into a canonical sample.

Every adapter has the signature `adapt_<format>(row, *, origin, image_root) -> SFTSample | PreferenceSample` and
raises `DataError(origin, field, problem)` for a bad row. Each problem reads `"<reason>: <details>"`; the reason is a
short fixed phrase (`skip_reason`) under which skipped rows are counted. Adapters never change the data they keep:
text is copied verbatim (no stripping), and anything they cannot represent (an unknown role, a part type, an embedded
image, a stray field) is an error rather than dropped.

Formats (`FORMATS`):
  trl_messages    `messages` [{role, content}] with content a string or parts [{"type": "text", "text"}, {"type":
                  "image"}], and `images` [..]. None-filled struct fields from HF datasets are tolerated.
  llava           `conversations` [{from: human|gpt|system, value}] with `<image>` tags; `image` a path or a list.
  sharegpt        `conversations` [{from: human|user|gpt|assistant|system, value}] with `<image>` tags; `images`.
  vqa             `image`, a question (`question` or `query`), answers (`answers`, `label` or `answer`: a string or
                  a list, the first one trained on, all kept for eval by `vqa_references`).
  trl_preference  `prompt` (messages or a string), `chosen`/`rejected` (one assistant message or a string),
                  `images`, optional `rejected_images`.
  rlaif_v         `image`, `question`, `chosen`, `rejected` (strings).

Images arrive as a path string, an HF-datasets image dict `{"bytes", "path"}` (columns loaded with decode=False) or
raw bytes. A path is resolved against the source's image root and must stay inside it (symlinks and `..` resolved).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from data.conversation import TAG_TEXT as IMAGE_TAG
from data.conversation import check_completion, problem, validate_conversation
from data.paths import path_problem, resolved
from data.sample import (
    DataError,
    ImagePart,
    ImageRef,
    Origin,
    Part,
    PreferenceSample,
    Role,
    SFTSample,
    TextPart,
    Turn,
)

TRL_ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}
LLAVA_ROLES: dict[str, Role] = {"system": "system", "human": "user", "gpt": "assistant"}
SHAREGPT_ROLES: dict[str, Role] = {**LLAVA_ROLES, "user": "user", "assistant": "assistant"}

# Known names of the VQA columns: ChartQA uses `query`/`label`, DocVQA and TextVQA `question`/`answers`.
VQA_QUESTION_COLUMNS = ("question", "query")
VQA_ANSWER_COLUMNS = ("answers", "label", "answer")


_error = problem  # every adapter error: DataError(origin, field, "<reason>: <detail>")


def skip_reason(error: DataError) -> str:
    """The short fixed phrase a problem starts with (`"roles out of order"`), to count skipped rows by."""
    return error.problem.partition(":")[0]


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------- columns


def apply_columns(row: Mapping[str, Any], columns: Mapping[str, str], *, origin: Origin) -> dict[str, Any]:
    """Rename raw columns to the names the adapter reads (`columns` maps raw name -> canonical name)."""
    renamed = {key: value for key, value in row.items() if key not in columns}
    for raw, canonical in columns.items():
        if raw not in row:
            raise _error(
                origin,
                raw,
                "missing column",
                f"the recipe's columns map '{raw}' -> '{canonical}' but the row has {sorted(row)}; "
                "fix the columns mapping",
            )
        if canonical in renamed:
            raise _error(
                origin,
                canonical,
                "column collision",
                f"the recipe's columns map '{raw}' -> '{canonical}' but '{canonical}' is already a column; "
                f"rename '{canonical}' away as well or map '{raw}' elsewhere",
            )
        renamed[canonical] = row[raw]
    return renamed


def _require(row: Mapping[str, Any], key: str, *, origin: Origin) -> Any:
    value = row.get(key)
    if value is None:
        raise _error(
            origin,
            key,
            "missing column",
            f"'{key}' is absent or None (columns: {sorted(row)}); map the right column onto it with the "
            "source's `columns`",
        )
    return value


def _require_str(row: Mapping[str, Any], key: str, *, origin: Origin) -> str:
    value = _require(row, key, origin=origin)
    if not isinstance(value, str):
        raise _error(
            origin, key, "bad text type", f"expected a string, got {type(value).__name__} {_preview(value)}"
        )
    return value


# ---------------------------------------------------------------------------------------------------- images


def confined_image_path(
    value: str | os.PathLike, *, image_root: Path | None, origin: Origin, field: str
) -> Path:
    """Resolve an image path against `image_root`; it must be a readable regular file and stay inside the root after
    resolving symlinks and `..` (a row must not make us read arbitrary files). Filesystem oddities (a loop of links,
    a socket or device, permission denied, a name that is not valid text) are named (data/paths.py)."""
    if str(value) == "":
        raise _error(origin, field, "bad image", "the image path is empty")
    if "://" in str(value):
        # Streaming a hub imagefolder yields hf:// URLs; this layer reads no network paths.
        raise _error(
            origin,
            field,
            "remote image path",
            f"{str(value)!r} is a URL; use a dataset whose image column embeds the bytes (parquet), or "
            "download the images and set the source's image_root",
        )
    if image_root is None:
        raise _error(
            origin,
            field,
            "no image root",
            f"image {str(value)!r} is a path but the source has no image_root; set the source's image_root "
            "to the folder that holds its images",
        )
    root, root_problem, target, target_problem, problem, inside = resolved_under(str(image_root), str(value))
    if root is None:
        raise _error(
            origin,
            field,
            "unreadable image path",
            f"the source's image_root {str(image_root)!r} "
            f"{root_problem}. Fix: point image_root at the folder that holds the images",
        )
    if target is None:
        raise _error(
            origin,
            field,
            "unreadable image path",
            f"{str(value)!r} (under {root}) {target_problem}. Fix: "
            "correct the path in this row, or drop the row",
        )
    if not inside:  # target.is_relative_to(root), memoised with the resolution instead of recomputed per row
        raise _error(
            origin,
            field,
            "image path escapes image_root",
            f"{str(value)!r} resolves to {target}, outside {root}; keep the images under the image_root "
            "or point image_root at a folder that contains them",
        )
    if problem in ("does not exist", "is a symbolic link to nothing"):
        raise _error(
            origin, field, "image file not found", f"{str(value)!r} resolves to {target}, which {problem}"
        )
    if problem is not None:
        raise _error(
            origin,
            field,
            "unreadable image path",
            f"{str(value)!r} resolves to {target}, which {problem}. "
            "Fix: make it a readable image file, or drop the row",
        )
    return target


@functools.lru_cache(maxsize=1 << 16)
def resolved_under(image_root: str, value: str):
    """(root, why the root cannot be resolved, the resolved path, why it cannot be, why it is no readable file,
    whether it lies inside the root) (data/paths.py phrases; None where fine): resolving walks every component with
    lstat, and datasets re-use their images across many rows; memoised while one source is read (data.sources clears
    it before each read, so a file that appears or vanishes between runs is seen)."""
    root, root_problem = resolved(Path(image_root))
    if root is None:
        return None, root_problem, None, None, None, False
    target, target_problem = resolved(root / value)
    if target is None or not target.is_relative_to(root):
        return root, None, target, target_problem, None, False
    return root, None, target, None, path_problem(target), True


def resolve_image(value: Any, *, image_root: Path | None, origin: Origin, field: str) -> ImageRef:
    """A path, raw bytes, or an HF-datasets image dict `{"bytes", "path"}` (bytes win when both are set) -> ImageRef."""
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) == 0:
            raise _error(origin, field, "bad image", "the image bytes are empty")
        return ImageRef(data=bytes(value))
    if isinstance(value, str | os.PathLike):
        return ImageRef(path=confined_image_path(value, image_root=image_root, origin=origin, field=field))
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return resolve_image(value["bytes"], image_root=image_root, origin=origin, field=f"{field}.bytes")
        if value.get("path") is not None:
            return resolve_image(value["path"], image_root=image_root, origin=origin, field=f"{field}.path")
        raise _error(origin, field, "bad image", "the image dict has neither bytes nor a path")
    raise _error(
        origin,
        field,
        "bad image",
        f"expected a path, bytes or a {{'bytes', 'path'}} dict, got {type(value).__name__}; an image column "
        "of HF datasets must be read with decode=False (data.sources does this)",
    )


def _images_list(value: Any, *, image_root: Path | None, origin: Origin, field: str) -> tuple[ImageRef, ...]:
    """A list of images; absent (None) means none."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _error(
            origin,
            field,
            "bad images type",
            f"expected a list of images, got {type(value).__name__} {_preview(value)}",
        )
    return tuple(
        resolve_image(item, image_root=image_root, origin=origin, field=f"{field}[{i}]")
        for i, item in enumerate(value)
    )


# ---------------------------------------------------------------------------------------------------- content


def text_parts(text: str) -> tuple[Part, ...]:
    """Plain text as parts; the empty string has none."""
    return (TextPart(text),) if text else ()


def tagged_text_parts(text: str) -> tuple[Part, ...]:
    """Text whose `<image>` tags mark image positions: "<image>\\nWhat?" -> ImagePart, TextPart("\\nWhat?")."""
    parts: list[Part] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i > 0:
            parts.append(ImagePart())
        parts.extend(text_parts(piece))
    return tuple(parts)


def _unused_keys_must_be_none(part: Mapping[str, Any], used: set[str], *, origin: Origin, field: str) -> None:
    # HF datasets stores parts as one struct type, so a text part also carries `image`/`index` keys set to None.
    for key, value in part.items():
        if key not in used and value is not None:
            raise _error(
                origin,
                f"{field}.{key}",
                "unsupported part field",
                f"a '{part['type']}' part does not use '{key}' (value {_preview(value)}); it would be lost",
            )


def _trl_part(part: Any, *, image_position: int, origin: Origin, field: str) -> Part:
    """One TRL content part. `image_position` is how many images precede it in the conversation."""
    if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
        raise _error(
            origin,
            field,
            "bad content part",
            f"expected a {{'type': ...}} dict, got {type(part).__name__} {_preview(part)}",
        )
    if part["type"] == "text":
        _unused_keys_must_be_none(part, {"type", "text"}, origin=origin, field=field)
        if not isinstance(part.get("text"), str):
            raise _error(
                origin,
                f"{field}.text",
                "bad text type",
                f"a text part needs a string 'text', got {_preview(part.get('text'))}",
            )
        return TextPart(part["text"])
    if part["type"] == "image":
        _unused_keys_must_be_none(part, {"type", "index"}, origin=origin, field=field)
        # llava-instruct-mix-vsft numbers its image parts; the number must agree with the reading order we use.
        if part.get("index") is not None and part["index"] != image_position:
            raise _error(
                origin,
                f"{field}.index",
                "image index out of order",
                f"image part {image_position} in reading order has index {part['index']}; the k-th image "
                "part must refer to images[k]",
            )
        return ImagePart()
    raise _error(
        origin,
        f"{field}.type",
        "unsupported part type",
        f"{part['type']!r}; only 'text' and 'image' parts are supported",
    )


def _trl_content(content: Any, *, images_before: int, origin: Origin, field: str) -> tuple[Part, ...]:
    """TRL content: a plain string (text only, `<image>` is not a tag here) or a list of parts."""
    if isinstance(content, str):
        return text_parts(content)
    if not isinstance(content, list | tuple):
        raise _error(
            origin,
            field,
            "bad content type",
            f"expected a string or a list of parts, got {type(content).__name__} {_preview(content)}",
        )
    parts: list[Part] = []
    image_position = images_before
    for i, raw_part in enumerate(content):
        part = _trl_part(raw_part, image_position=image_position, origin=origin, field=f"{field}[{i}]")
        image_position += isinstance(part, ImagePart)
        if part != TextPart(""):
            parts.append(part)
    return tuple(parts)


def _tagged_content(value: Any, *, origin: Origin, field: str) -> tuple[Part, ...]:
    if not isinstance(value, str):
        raise _error(
            origin,
            field,
            "bad content type",
            f"expected a string, got {type(value).__name__} {_preview(value)}",
        )
    return tagged_text_parts(value)


# ---------------------------------------------------------------------------------------------------- turns


def _role(message: Any, *, role_key: str, roles: Mapping[str, Role], origin: Origin, field: str) -> Role:
    """The canonical role of one message dict (`roles` maps this format's role names onto ours)."""
    if not isinstance(message, Mapping):
        raise _error(
            origin, field, "bad message", f"expected a dict, got {type(message).__name__} {_preview(message)}"
        )
    raw_role = message.get(role_key)
    if not isinstance(raw_role, str) or raw_role not in roles:
        raise _error(
            origin,
            f"{field}.{role_key}",
            "unknown role",
            f"{raw_role!r}; this format accepts {sorted(roles)}",
        )
    return roles[raw_role]


def _trl_turns(messages: Any, *, origin: Origin, field: str) -> tuple[Turn, ...]:
    """TRL `[{role, content}]` messages -> turns; image parts are numbered across the whole list."""
    if not isinstance(messages, list | tuple):
        raise _error(
            origin, field, "bad messages type", f"expected a list of messages, got {type(messages).__name__}"
        )
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        role = _role(message, role_key="role", roles=TRL_ROLES, origin=origin, field=f"{field}[{i}]")
        parts = _trl_content(
            message.get("content"),
            images_before=sum(t.num_images for t in turns),
            origin=origin,
            field=f"{field}[{i}].content",
        )
        turns.append(Turn(role=role, parts=parts))
    return tuple(turns)


def _tagged_turns(
    conversations: Any, *, roles: Mapping[str, Role], origin: Origin, field: str
) -> tuple[Turn, ...]:
    """llava/sharegpt `[{from, value}]` with `<image>` tags -> turns."""
    if not isinstance(conversations, list | tuple):
        raise _error(
            origin,
            field,
            "bad messages type",
            f"expected a list of messages, got {type(conversations).__name__}",
        )
    turns: list[Turn] = []
    for i, message in enumerate(conversations):
        role = _role(message, role_key="from", roles=roles, origin=origin, field=f"{field}[{i}]")
        turns.append(
            Turn(
                role=role,
                parts=_tagged_content(message.get("value"), origin=origin, field=f"{field}[{i}].value"),
            )
        )
    return tuple(turns)


# ---------------------------------------------------------------------------------------------------- SFT formats


def adapt_trl_messages(row: Mapping[str, Any], *, origin: Origin, image_root: Path | None) -> SFTSample:
    images = _images_list(row.get("images"), image_root=image_root, origin=origin, field="images")
    turns = _trl_turns(_require(row, "messages", origin=origin), origin=origin, field="messages")
    validate_conversation(
        turns, num_images=len(images), images_field="images", origin=origin, field="messages"
    )
    return SFTSample(turns=turns, images=images, origin=origin)


def adapt_llava(row: Mapping[str, Any], *, origin: Origin, image_root: Path | None) -> SFTSample:
    image = row.get("image")
    # LLaVA rows hold one image path, a list of them, or none for text-only rows.
    raw_images = image if isinstance(image, list | tuple) or image is None else [image]
    images = _images_list(raw_images, image_root=image_root, origin=origin, field="image")
    turns = _tagged_turns(
        _require(row, "conversations", origin=origin), roles=LLAVA_ROLES, origin=origin, field="conversations"
    )
    validate_conversation(
        turns,
        num_images=len(images),
        images_field="image",
        origin=origin,
        field="conversations",
        role_key="from",
    )
    return SFTSample(turns=turns, images=images, origin=origin)


def adapt_sharegpt(row: Mapping[str, Any], *, origin: Origin, image_root: Path | None) -> SFTSample:
    images = _images_list(row.get("images"), image_root=image_root, origin=origin, field="images")
    turns = _tagged_turns(
        _require(row, "conversations", origin=origin),
        roles=SHAREGPT_ROLES,
        origin=origin,
        field="conversations",
    )
    validate_conversation(
        turns,
        num_images=len(images),
        images_field="images",
        origin=origin,
        field="conversations",
        role_key="from",
    )
    return SFTSample(turns=turns, images=images, origin=origin)


def _one_column_of(row: Mapping[str, Any], candidates: Sequence[str], *, what: str, origin: Origin) -> str:
    present = [name for name in candidates if name in row]
    if len(present) != 1:
        found = f"found {present}" if present else f"found none among {sorted(row)}"
        raise _error(
            origin,
            "/".join(candidates),
            "ambiguous column" if present else "missing column",
            f"a vqa row needs exactly one {what} column of {list(candidates)}, {found}; map one with the "
            "source's `columns`",
        )
    return present[0]


def _vqa_answers(row: Mapping[str, Any], *, origin: Origin) -> tuple[str, list[str]]:
    """(answers column name, every answer): a string is one answer, a list holds several."""
    column = _one_column_of(row, VQA_ANSWER_COLUMNS, what="answers", origin=origin)
    value = row[column]
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list | tuple) or not answers:
        raise _error(
            origin,
            column,
            "no answers",
            f"expected a string or a non-empty list of strings, got {_preview(value)}",
        )
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise _error(
                origin,
                f"{column}[{i}]",
                "bad text type",
                f"expected a string answer, got {type(answer).__name__} {_preview(answer)}",
            )
    return column, list(answers)


def vqa_references(row: Mapping[str, Any], columns: Mapping[str, str], *, origin: Origin) -> list[str]:
    """Every reference answer of a vqa row, for eval (training uses only the first)."""
    return _vqa_answers(apply_columns(row, columns, origin=origin), origin=origin)[1]


def adapt_vqa(row: Mapping[str, Any], *, origin: Origin, image_root: Path | None) -> SFTSample:
    """One user turn (the image, then the question) and one assistant turn (the first answer)."""
    question = _require_str(
        row, _one_column_of(row, VQA_QUESTION_COLUMNS, what="question", origin=origin), origin=origin
    )
    answer_column, answers = _vqa_answers(row, origin=origin)
    if answers[0].strip() == "":
        raise _error(
            origin, f"{answer_column}[0]", "empty assistant turn", "the first answer (trained on) is blank"
        )
    image = resolve_image(
        _require(row, "image", origin=origin), image_root=image_root, origin=origin, field="image"
    )
    turns = (
        Turn(role="user", parts=(ImagePart(), *text_parts(question))),
        Turn(role="assistant", parts=text_parts(answers[0])),
    )
    return SFTSample(turns=turns, images=(image,), origin=origin)


# ---------------------------------------------------------------------------------------------------- preference


def _trl_prompt(value: Any, *, origin: Origin) -> tuple[Turn, ...]:
    if isinstance(value, str):
        return (Turn(role="user", parts=text_parts(value)),)
    return _trl_turns(value, origin=origin, field="prompt")


def _trl_completion(value: Any, *, origin: Origin, field: str) -> Turn:
    """A completion: a string or a list holding exactly one assistant message."""
    if isinstance(value, str):
        turn = Turn(role="assistant", parts=text_parts(value))
    elif isinstance(value, list | tuple) and len(value) == 1:
        turn = _trl_turns(value, origin=origin, field=field)[0]
        if turn.role != "assistant":
            raise _error(
                origin,
                f"{field}[0].role",
                "roles out of order",
                f"a completion must be an 'assistant' message, got '{turn.role}'",
            )
    else:
        raise _error(
            origin,
            field,
            "bad completion",
            f"expected a string or a list with one assistant message, got {_preview(value)}; put shared "
            "turns in 'prompt' (implicit-prompt rows are not supported)",
        )
    check_completion(turn, origin, field)
    return turn


def _distinct_pair(sample: PreferenceSample) -> PreferenceSample:
    """A pair whose chosen equals its rejected (same text, same images) teaches nothing and gives a zero margin."""
    if sample.rejected_images is None and sample.chosen.text == sample.rejected.text:
        raise _error(
            sample.origin,
            "rejected",
            "identical completions",
            f"chosen and rejected are the same text ({_preview(sample.chosen.text)}): drop the row or fix it",
        )
    return sample


def adapt_trl_preference(
    row: Mapping[str, Any], *, origin: Origin, image_root: Path | None
) -> PreferenceSample:
    images = _images_list(row.get("images"), image_root=image_root, origin=origin, field="images")
    prompt = _trl_prompt(_require(row, "prompt", origin=origin), origin=origin)
    validate_conversation(
        prompt,
        num_images=len(images),
        images_field="images",
        origin=origin,
        field="prompt",
        final_role="user",
    )
    chosen = _trl_completion(_require(row, "chosen", origin=origin), origin=origin, field="chosen")
    rejected = _trl_completion(_require(row, "rejected", origin=origin), origin=origin, field="rejected")
    rejected_images = None
    if row.get("rejected_images") is not None:
        rejected_images = _images_list(
            row["rejected_images"], image_root=image_root, origin=origin, field="rejected_images"
        )
        if len(rejected_images) != len(images):
            raise _error(
                origin,
                "rejected_images",
                "image count mismatch",
                f"{len(rejected_images)} rejected image(s) for {len(images)} prompt image slot(s)",
            )
    return _distinct_pair(
        PreferenceSample(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            images=images,
            origin=origin,
            rejected_images=rejected_images or None,
        )
    )


def adapt_rlaif_v(row: Mapping[str, Any], *, origin: Origin, image_root: Path | None) -> PreferenceSample:
    """RLAIF-V: one user turn (the image, then the question) and two string completions."""
    image = resolve_image(
        _require(row, "image", origin=origin), image_root=image_root, origin=origin, field="image"
    )
    prompt = (
        Turn(role="user", parts=(ImagePart(), *text_parts(_require_str(row, "question", origin=origin)))),
    )
    completions = {}
    for key in ("chosen", "rejected"):
        completions[key] = Turn(role="assistant", parts=text_parts(_require_str(row, key, origin=origin)))
        check_completion(completions[key], origin, key)
    return _distinct_pair(
        PreferenceSample(
            prompt=prompt,
            chosen=completions["chosen"],
            rejected=completions["rejected"],
            images=(image,),
            origin=origin,
        )
    )


Adapter = Callable[..., SFTSample | PreferenceSample]

SFT_ADAPTERS: dict[str, Adapter] = {
    "trl_messages": adapt_trl_messages,
    "llava": adapt_llava,
    "sharegpt": adapt_sharegpt,
    "vqa": adapt_vqa,
}
PREFERENCE_ADAPTERS: dict[str, Adapter] = {
    "trl_preference": adapt_trl_preference,
    "rlaif_v": adapt_rlaif_v,
}
ADAPTERS: dict[str, Adapter] = {**SFT_ADAPTERS, **PREFERENCE_ADAPTERS}
FORMATS = tuple(ADAPTERS)


def adapter_for(format: str, *, dataset: str) -> Adapter:
    if format not in ADAPTERS:
        raise ValueError(f"data source {dataset}: unknown format {format!r}; choose one of {list(FORMATS)}")
    return ADAPTERS[format]


def adapt_row(
    row: Mapping[str, Any],
    *,
    format: str,
    columns: Mapping[str, str],
    origin: Origin,
    image_root: Path | None,
) -> SFTSample | PreferenceSample:
    """Rename the row's columns, then adapt it with the format's adapter."""
    adapter = adapter_for(format, dataset=origin.dataset)
    return adapter(apply_columns(row, columns, origin=origin), origin=origin, image_root=image_root)
