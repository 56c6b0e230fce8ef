"""The canonical samples every dataset adapter produces, and everything downstream consumes.

An SFT sample is a conversation: turns of `system` / `user` / `assistant`, each a sequence of text and image parts.
Image parts carry no payload: the k-th `ImagePart` in reading order refers to `images[k]`. A preference sample is a
prompt conversation plus one chosen and one rejected assistant turn; `rejected_images`, when set, replaces `images`
for the rejected completion (image-contrast pairs).

Images are references (a file path already confined to its dataset root, or encoded bytes), never decoded pixels:
the token count of an image needs only its (width, height), which the file header gives without decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """A slot for the next image of the sample, in reading order."""


Part = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where an image's encoded bytes live: exactly one of `path` or `data` is set."""

    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path= or data=")

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"<{len(self.data)} bytes>"


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, ImagePart) for p in self.parts)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a sample came from, so that every error and skip can name the dataset and the row."""

    dataset: str
    row: int

    def __str__(self) -> str:
        return f"{self.dataset} row {self.row}"


@dataclass(frozen=True, slots=True)
class SFTSample:
    turns: tuple[Turn, ...]
    images: tuple[ImageRef, ...]
    origin: Origin


@dataclass(frozen=True, slots=True)
class PreferenceSample:
    prompt: tuple[Turn, ...]
    chosen: Turn
    rejected: Turn
    images: tuple[ImageRef, ...]
    origin: Origin
    rejected_images: tuple[ImageRef, ...] | None = None


class DataError(ValueError):
    """A bad row: the message names the dataset, the row and the field."""

    def __init__(self, origin: Origin, field: str, problem: str):
        super().__init__(f"{origin}, field '{field}': {problem}")
        self.origin = origin
        self.field = field
        self.problem = problem
