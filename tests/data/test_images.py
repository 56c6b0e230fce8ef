"""data/images.py: header-only sizes, RGB decoding of every pixel mode, and a DataError for every bad file."""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from data.images import DEFAULT_MAX_PIXELS, image_size, load_rgb
from data.sample import DataError, ImageRef, Origin

ORIGIN = Origin(dataset="chartqa", row=7)
FIELD = "images[0]"


def _png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def _write(tmp_path: Path, name: str, payload: bytes) -> ImageRef:
    path = tmp_path / name
    path.write_bytes(payload)
    return ImageRef(path=path)


def _noise_png(width: int = 64, height: int = 48) -> bytes:
    # Random pixels do not compress, so the pixel data is most of the file and a cut lands inside it.
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return _png_bytes(Image.fromarray(pixels))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) over a few bytes of pixel data: a cheap 'bomb'."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(bytes(16)))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _assert_names_row(error: DataError) -> None:
    message = str(error)
    assert "chartqa row 7" in message and "'images[0]'" in message
    assert error.origin == ORIGIN and error.field == FIELD


# ---- sizes from the header --------------------------------------------------------------------------------------


def test_image_size_reads_width_then_height_from_path_and_bytes(tmp_path):
    payload = _png_bytes(Image.new("RGB", (37, 21), (1, 2, 3)))
    assert image_size(_write(tmp_path, "a.png", payload), ORIGIN, FIELD, DEFAULT_MAX_PIXELS) == (37, 21)
    assert image_size(ImageRef(data=payload), ORIGIN, FIELD, DEFAULT_MAX_PIXELS) == (37, 21)


def test_image_size_reads_only_the_header(tmp_path):
    # The pixel data is cut off: the size is still known, decoding is what fails.
    ref = _write(tmp_path, "cut.png", _noise_png()[:200])
    assert image_size(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS) == (64, 48)
    with pytest.raises(DataError, match="truncated or corrupt") as caught:
        load_rgb(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
    _assert_names_row(caught.value)


def test_decoded_size_equals_header_size_despite_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    ref = _write(tmp_path, "rotated.jpg", buffer.getvalue())
    assert image_size(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS) == (40, 20)
    assert load_rgb(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS).size == (40, 20)


# ---- bad files --------------------------------------------------------------------------------------------------


def _bad_refs(tmp_path: Path) -> dict[str, tuple[ImageRef, str]]:
    """Each bad input, with a phrase its error message must contain."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    return {
        "missing": (ImageRef(path=tmp_path / "absent.png"), "does not exist"),
        "zero-byte file": (_write(tmp_path, "empty.png", b""), "empty (0 bytes)"),
        "zero bytes inline": (ImageRef(data=b""), "empty (0 bytes)"),
        "directory": (ImageRef(path=tmp_path / "folder.png"), "not a regular file"),
        "fifo": (ImageRef(path=fifo), "not a regular file"),
        "random bytes": (
            _write(tmp_path, "noise.png", np.random.default_rng(1).bytes(512)),
            "not a readable image",
        ),
        "cut inside the header": (_write(tmp_path, "stub.png", _noise_png()[:20]), "not a readable image"),
        "text file": (ImageRef(data=b"<html>not found</html>"), "not a readable image"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "zero-byte file",
        "zero bytes inline",
        "directory",
        "fifo",
        "random bytes",
        "cut inside the header",
        "text file",
    ],
)
def test_bad_files_raise_data_error_naming_dataset_row_and_field(tmp_path, case):
    ref, phrase = _bad_refs(tmp_path)[case]
    for read in (image_size, load_rgb):
        with pytest.raises(DataError, match=re.escape(phrase)) as caught:
            read(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
        _assert_names_row(caught.value)


def test_corrupt_pixel_data_with_a_valid_header_raises_data_error(tmp_path):
    payload = bytearray(_noise_png())
    payload[-300:-200] = bytes(100)  # zero out part of the compressed stream: CRC and zlib both break
    with pytest.raises(DataError, match="cannot be decoded") as caught:
        load_rgb(_write(tmp_path, "corrupt.png", bytes(payload)), ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
    _assert_names_row(caught.value)


# ---- decompression-bomb guard -----------------------------------------------------------------------------------


def test_pixel_limit_refuses_before_decoding(tmp_path):
    ref = _write(tmp_path, "small.png", _png_bytes(Image.new("RGB", (64, 64))))
    for read in (image_size, load_rgb):
        with pytest.raises(DataError, match=r"64x64 = 4096 pixels, over .* max_pixels=4095") as caught:
            read(ref, ORIGIN, FIELD, 4095)
        _assert_names_row(caught.value)
    assert image_size(ref, ORIGIN, FIELD, 4096) == (64, 64)


def test_huge_header_is_refused_even_when_pillows_own_guard_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    ref = _write(tmp_path, "bomb.png", _png_header_only(100_000, 100_000))
    for read in (image_size, load_rgb):
        with pytest.raises(DataError, match="100000x100000 = 10000000000 pixels") as caught:
            read(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
        _assert_names_row(caught.value)


def test_huge_header_under_pillows_default_guard_is_a_data_error_and_globals_stay(tmp_path):
    pillow_limit, truncated_policy = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    ref = _write(tmp_path, "bomb.png", _png_header_only(100_000, 100_000))
    with pytest.raises(DataError, match="Pillow's own decompression-bomb limit") as caught:
        load_rgb(ref, ORIGIN, FIELD, 10**12)
    _assert_names_row(caught.value)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (pillow_limit, truncated_policy)


@pytest.mark.parametrize("bad_limit", [0, -1, 1.5, True, None])
def test_max_pixels_must_be_a_positive_int(bad_limit):
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        image_size(ImageRef(data=b"x"), ORIGIN, FIELD, bad_limit)


# ---- pixel modes ------------------------------------------------------------------------------------------------


def _load(payload: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning may leak (e.g. palette transparency)
        image = load_rgb(ImageRef(data=payload), ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
    assert image.mode == "RGB"
    return image


def test_rgb_png_round_trips_exactly():
    pixels = np.random.default_rng(2).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(_load(_png_bytes(Image.fromarray(pixels)))), pixels)


def test_cmyk_jpeg_becomes_rgb():
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=95)  # pure red in CMYK
    red, green, blue = _load(buffer.getvalue()).getpixel((8, 8))
    assert red > 230 and green < 25 and blue < 25


def test_rgba_png_drops_alpha_like_the_official_processor():
    image = Image.new(
        "RGBA", (4, 4), (10, 20, 30, 0)
    )  # fully transparent: the stored colour is kept, not white
    image.putpixel((1, 1), (200, 100, 50, 128))
    rgb = _load(_png_bytes(image))
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((1, 1)) == (200, 100, 50)


def test_la_png_drops_alpha():
    assert _load(_png_bytes(Image.new("LA", (3, 3), (90, 0)))).getpixel((2, 2)) == (90, 90, 90)


def test_palette_png_with_transparency_keeps_palette_colours_without_warning():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((3, 3), 1)
    # Per-entry alpha (bytes): the form on which Pillow's P -> RGB conversion warns.
    rgb = _load(_png_bytes(image, transparency=b"\x00\x80"))
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((3, 3)) == (0, 255, 0)
    assert _load(_png_bytes(image, transparency=0)).getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    samples = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    payload = _png_bytes(Image.fromarray(samples))
    assert Image.open(io.BytesIO(payload)).mode.startswith("I;16")
    assert [pixel[0] for pixel in _load(payload).getdata()] == [0, 4, 128, 255]


def test_thirty_two_bit_integer_grayscale_is_read_as_sixteen_bit():
    samples = np.array([[-5, 257, 32768, 70000]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format="TIFF")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I"
    assert [pixel[0] for pixel in _load(buffer.getvalue()).getdata()] == [0, 1, 128, 255]


def test_float_grayscale_is_rounded_and_clipped_on_the_0_255_scale():
    samples = np.array([[-3.0, 127.6, 300.0, np.nan]], dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format="TIFF")
    assert [pixel[0] for pixel in _load(buffer.getvalue()).getdata()] == [0, 128, 255, 0]


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_gray_and_bilevel_become_rgb(mode, value, expected):
    assert _load(_png_bytes(Image.new(mode, (5, 5), value))).getpixel((4, 4)) == expected


def _two_frames(image_format: str, **save_options) -> bytes:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format=image_format,
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
        **save_options,
    )
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_their_first_frame(image_format):
    if image_format == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow build has no WebP support")
    payload = _two_frames(image_format, **({"lossless": True} if image_format == "WEBP" else {}))
    assert getattr(Image.open(io.BytesIO(payload)), "n_frames", 1) == 2
    assert _load(payload).getpixel((4, 4)) == (255, 0, 0)


def test_loaded_image_is_detached_from_the_file(tmp_path):
    ref = _write(tmp_path, "red.png", _png_bytes(Image.new("RGB", (6, 6), (255, 0, 0))))
    image = load_rgb(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
    ref.path.unlink()
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_rgb_input_is_returned_as_a_new_image_each_time():
    payload = _png_bytes(Image.new("RGB", (3, 3), (5, 6, 7)))
    ref = ImageRef(data=payload)
    first = load_rgb(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS)
    first.putpixel((0, 0), (0, 0, 0))
    assert load_rgb(ref, ORIGIN, FIELD, DEFAULT_MAX_PIXELS).getpixel((0, 0)) == (5, 6, 7)
    assert ref.data == payload
