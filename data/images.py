"""Safe image decoding for every dataset: header-only sizes for length planning, RGB pixels for the processor.

Every failure is a `DataError` naming the dataset, the row and the field, so that a bad file in a million-row
dataset is found from the message alone, and the recipe's `on_bad_sample` policy can skip or stop on it.

Choices, and why:

- **Decompression-bomb guard of our own.** `max_pixels` is checked against the header's (width, height) before any
  pixel is decoded. Pillow's global `PIL.Image.MAX_IMAGE_PIXELS` is neither relied on (another library in the
  process may have set it to `None`) nor changed (it is process-wide). Pillow still refuses, on its own, images
  over twice that global; such a file is reported as a `DataError` too.
- **Alpha is dropped, not composited.** The official Phi-3-V processor (hub `image_processing_phi3_v.py`,
  written for transformers 4.38-4.40) calls `image.convert('RGB')`, and the transformers `convert_to_rgb` of that
  era is the same plain `convert('RGB')`. So the colour under a transparent pixel is kept as stored, as the model
  saw it in training. (transformers 5.x `convert_to_rgb` composites onto white instead; we match the checkpoint.)
- **16-bit and float grayscale are scaled, not clipped.** Pillow's `convert('RGB')` clips 'I;16' and 'I' samples
  at 255, which turns most 16-bit scans white. 'I;16*' and 'I' samples are read as 16-bit (0..65535, the range
  Pillow decodes 16-bit PNG and TIFF into; values outside are clipped) and mapped to 0..255 by v/257, rounded.
  'F' samples are read on Pillow's 0..255 scale (its own 'F' -> 'L' convention), rounded and clipped; NaN -> 0.
- **Only the first frame** of an animated GIF/PNG/WebP is used: a frame sequence is not one image.
- **No EXIF rotation**, like the official processor: the decoded size then always equals the header size that
  the token count was planned with.
"""

from __future__ import annotations

import io
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
from PIL import Image

from config.schema import MAX_IMAGE_PIXELS
from data.paths import os_error_problem, path_problem, text_problem
from data.sample import DataError, ImageRef, Origin

DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS
"""The same bound as Pillow's default `MAX_IMAGE_PIXELS` (~ 9459 x 9459), stated here so it holds even where
another library disabled Pillow's own check; the recipe's `data.max_image_pixels` defaults to it."""

# What Pillow raises on unreadable or corrupt data: UnidentifiedImageError and "image file is truncated" are
# OSErrors; some plugins raise SyntaxError, ValueError, EOFError or struct.error on malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_SIXTEEN_BIT_MAX = 65535
# 65535 / 255 = 257 exactly: v / 257 maps the 16-bit range onto the 8-bit one end to end.
_SIXTEEN_TO_EIGHT_BIT = 257


def image_size(
    ref: ImageRef, origin: Origin, field: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) in pixels from the file header alone, without decoding pixels; for length planning."""
    _check_max_pixels_setting(max_pixels)
    with _opened(ref, origin, field) as image:
        size = image.size
    _check_pixel_count(size, ref, origin, field, max_pixels)
    return size


def load_rgb(ref: ImageRef, origin: Origin, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's first frame as a fully loaded 'RGB' image, detached from the file (see the module docstring)."""
    _check_max_pixels_setting(max_pixels)
    with _opened(ref, origin, field) as image:
        _check_pixel_count(image.size, ref, origin, field, max_pixels)
        _decode(image, ref, origin, field)
        converted = _converted_to_rgb(image)
    if converted is None:
        raise DataError(
            origin,
            field,
            f"{ref.describe()} has pixel mode '{image.mode}', which Pillow cannot convert to RGB; "
            "the row cannot be used. Fix: re-save the image as an RGB or grayscale PNG/JPEG.",
        )
    return converted


def _check_max_pixels_setting(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int (a pixel count), got {max_pixels!r}")


@contextmanager
def _opened(ref: ImageRef, origin: Origin, field: str) -> Iterator[Image.Image]:
    """The lazily opened image (header parsed, pixels not decoded); the file is closed on exit."""
    source = _byte_source(ref, origin, field)
    try:
        image = Image.open(source)
    except FileNotFoundError as error:
        raise DataError(origin, field, f"image file {ref.describe()} vanished while being opened") from error
    except PermissionError as error:
        raise DataError(origin, field, f"image file {ref.describe()} cannot be opened: {error}") from error
    except OSError as error:
        if error.errno is None:  # Pillow's own errors (no errno): an unreadable image, below
            raise _not_an_image(ref, origin, field, error) from error
        raise DataError(
            origin,
            field,
            f"image file {ref.describe()} {os_error_problem(error)} (it changed while the "
            "run read it). Fix: keep the dataset's files in place during the run",
        ) from error
    except Image.DecompressionBombError as error:
        raise DataError(
            origin,
            field,
            f"{ref.describe()} exceeds Pillow's own decompression-bomb limit "
            f"(2 x PIL.Image.MAX_IMAGE_PIXELS): {error}. Fix: shrink the image.",
        ) from error
    except _DECODE_ERRORS as error:
        raise _not_an_image(ref, origin, field, error) from error
    with image:
        yield image


def _not_an_image(ref: ImageRef, origin: Origin, field: str, error: BaseException) -> DataError:
    return DataError(
        origin,
        field,
        f"{ref.describe()} is not a readable image ({type(error).__name__}: {error}); "
        "the header is missing or corrupt. Fix: re-encode the file as PNG or JPEG, or drop the row.",
    )


def _byte_source(ref: ImageRef, origin: Origin, field: str) -> BinaryIO | str:
    """What `Image.open` reads: the bytes, or the path once it is known to be a non-empty regular file."""
    if ref.data is not None:
        if not ref.data:
            raise DataError(
                origin, field, "the image bytes are empty (0 bytes). Fix: drop the row or re-export it."
            )
        return io.BytesIO(ref.data)
    invalid = text_problem(ref.path)
    if invalid is not None:
        raise DataError(origin, field, f"image path {str(ref.path)!r} {invalid}. Fix: rename the file.")
    try:
        status = ref.path.stat()
    except FileNotFoundError as error:
        raise DataError(
            origin,
            field,
            f"image file {ref.path} does not exist. Fix: check the dataset's image root "
            "and the path in this row.",
        ) from error
    except OSError as error:
        raise DataError(
            origin,
            field,
            f"image file {ref.path} {os_error_problem(error)}. Fix: make it a readable "
            "file, or drop the row.",
        ) from error
    # A directory, socket, FIFO or device is refused before opening: reading a FIFO would block forever.
    if not stat.S_ISREG(status.st_mode):
        why = path_problem(ref.path) or "is not a regular file"
        raise DataError(origin, field, f"image path {ref.path} {why}. Fix: point the row at a file.")
    if status.st_size == 0:
        raise DataError(
            origin, field, f"image file {ref.path} is empty (0 bytes). Fix: re-download it or drop the row."
        )
    return str(ref.path)


def _check_pixel_count(
    size: tuple[int, int], ref: ImageRef, origin: Origin, field: str, max_pixels: int
) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DataError(origin, field, f"{ref.describe()} has an empty size {width}x{height} in its header")
    if width * height > max_pixels:
        raise DataError(
            origin,
            field,
            f"{ref.describe()} is {width}x{height} = {width * height} pixels, over the "
            f"decompression-bomb limit max_pixels={max_pixels}; it is not decoded. Fix: downscale the image, "
            "or raise max_pixels if you trust the file.",
        )


def _decode(image: Image.Image, ref: ImageRef, origin: Origin, field: str) -> None:
    """Decode the current (first) frame's pixels; truncated or corrupt pixel data becomes a DataError."""
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise DataError(
            origin,
            field,
            f"{ref.describe()} has a valid header but its pixel data cannot be decoded "
            f"({type(error).__name__}: {error}); the file is truncated or corrupt. Fix: re-download or "
            "re-encode it, or drop the row.",
        ) from error


def _converted_to_rgb(image: Image.Image) -> Image.Image | None:
    """A new 'RGB' image from a loaded one (never the same object), or None for a mode Pillow cannot convert."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return _sixteen_bit_gray_to_rgb(image)
    if image.mode == "F":
        return _float_gray_to_rgb(image)
    if image.mode in ("P", "PA"):
        # Through RGBA: Pillow warns on P -> RGB when the palette carries per-entry alpha; the RGB is the same.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        return None


def _sixteen_bit_gray_to_rgb(image: Image.Image) -> Image.Image:
    samples = np.asarray(image).astype(np.int64).clip(0, _SIXTEEN_BIT_MAX)
    # Integer rounding of v / 257: (v + 128) // 257, exact for every v in 0..65535.
    gray = ((samples + _SIXTEEN_TO_EIGHT_BIT // 2) // _SIXTEEN_TO_EIGHT_BIT).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _float_gray_to_rgb(image: Image.Image) -> Image.Image:
    samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    gray = np.rint(samples.clip(0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
