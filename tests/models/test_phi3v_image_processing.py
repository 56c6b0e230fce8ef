"""HD transform geometry, token counts (docs/phi3v.md#image-token-count) and crops, from sizes alone and from pixels."""

import pytest
import torch
from PIL import Image

from models.phi3v import Phi3VImageProcessor, crop_grid, hd_canvas_size, num_image_tokens
from models.phi3v.image_processing import CLIP_MEAN, CLIP_STD, hd_canvas, normalize_uint8

from ..conftest import drawn_image

# (width, height): tokens at num_crops 16, 4, 1 -- the table of docs/phi3v.md#image-token-count, checked there against the
# official processor.
TOKEN_TABLE = {
    (336, 336): (2509, 757, 313),
    (1344, 1344): (2509, 757, 313),
    (1000, 600): (2353, 757, 313),
    (600, 1000): (2377, 757, 313),
    (640, 480): (1921, 757, None),
    (1920, 1080): (2353, 757, None),
    (50, 8000): (2653, 781, None),
}


@pytest.mark.parametrize("size", sorted(TOKEN_TABLE))
def test_token_count_table(size):
    for num_crops, expected in zip((16, 4, 1), TOKEN_TABLE[size]):
        if expected is not None:
            assert num_image_tokens(*size, num_crops=num_crops) == expected


def test_canvas_sizes_seen_with_the_official_processor():
    # docs/phi3v.md#image-sizes: image_sizes [H, W] is the padded canvas; small images are upscaled.
    assert hd_canvas_size(1000, 600, 16) == (1680, 1008)
    assert hd_canvas_size(17, 23, 16) == (1008, 1344)
    assert crop_grid(64, 900, 16) == (14, 1)


@pytest.mark.parametrize("size", [(17, 23), (1000, 600), (600, 1000), (64, 900), (50, 8000), (3, 3)])
@pytest.mark.parametrize("num_crops", [16, 4, 1])
def test_pixels_agree_with_size_only_count(size, num_crops):
    processor = Phi3VImageProcessor(num_crops=num_crops)
    out = processor([drawn_image(*size)], do_normalize=False)
    rows, cols = crop_grid(*size, num_crops)
    assert out["pixel_values"].shape == (rows * cols, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.uint8
    assert out["image_sizes"].tolist() == [[rows * 336, cols * 336]]
    assert out["num_img_tokens"] == [num_image_tokens(*size, num_crops)]
    assert rows * cols <= num_crops


def test_padding_is_white_and_centred():
    canvas = hd_canvas(Image.new("RGB", (1000, 600), (0, 0, 0)), num_crops=16)
    assert canvas.size == (1680, 1008)
    # 1680 / (1000/600) = 1008 rows: no padding needed; a wider image pads top and bottom with white.
    wide = hd_canvas(Image.new("RGB", (1000, 100), (0, 0, 0)), num_crops=4)
    column = [wide.getpixel((10, y)) for y in range(wide.height)]
    assert column[0] == (255, 255, 255) and column[-1] == (255, 255, 255)
    assert column[wide.height // 2] == (0, 0, 0)


def test_float_output_is_the_normalised_uint8_output():
    processor = Phi3VImageProcessor(num_crops=4)
    image = drawn_image(640, 480)
    raw = processor([image], do_normalize=False)["pixel_values"]
    normalised = processor([image])["pixel_values"]
    assert normalised.dtype == torch.float32
    assert torch.equal(normalize_uint8(raw), normalised)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1"])
def test_image_modes_become_rgb(mode):
    image = drawn_image(100, 80, mode=mode)
    out = Phi3VImageProcessor(num_crops=1)([image], do_normalize=False)
    assert out["pixel_values"].shape == (1, 3, 336, 336)


def test_grayscale_gives_equal_channels():
    out = Phi3VImageProcessor(num_crops=1)([drawn_image(90, 60, mode="L")], do_normalize=False)[
        "pixel_values"
    ]
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_too_elongated_image_is_a_clear_error():
    with pytest.raises(ValueError, match="too elongated"):
        num_image_tokens(100_000, 1, num_crops=1)


def test_huge_image_costs_the_same_tokens_as_small():
    # Token counts depend on the aspect ratio only (images are resized to fill the crop budget).
    assert num_image_tokens(8000, 8000, 16) == num_image_tokens(16, 16, 16) == 2509


def test_caller_image_is_not_modified():
    image = drawn_image(120, 200, mode="RGBA")
    before = image.tobytes()
    Phi3VImageProcessor(num_crops=4)([image])
    assert image.mode == "RGBA" and image.tobytes() == before


def reference_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """The earlier out-of-place arithmetic (three temporaries): torchvision's ToTensor + Normalize."""
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return pixels.to(torch.float32).div(255).sub(mean).div(std)


def test_normalize_uint8_writes_once_in_place_and_is_bit_identical():
    pixels = torch.randint(
        0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    expected = reference_normalize(pixels)
    assert torch.equal(normalize_uint8(pixels), expected)
    out = torch.empty(pixels.shape)
    assert normalize_uint8(pixels, out=out).data_ptr() == out.data_ptr() and torch.equal(out, expected)
    for dtype in (
        torch.bfloat16,
        torch.float16,
    ):  # rounded from the float32 result, as the old path's .to(dtype)
        out = torch.empty(pixels.shape, dtype=dtype)
        assert normalize_uint8(pixels, out=out) is out and torch.equal(out, expected.to(dtype))
    assert torch.equal(
        normalize_uint8(pixels[0], out=torch.empty(3, 40, 40, dtype=torch.bfloat16)),
        expected[0].to(torch.bfloat16),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tower_batch_equals_normalise_then_cat_then_cast(tiny_model, tiny_processor, dtype):
    embed = tiny_model.model.vision_embed_tokens
    images = [drawn_image(64, 48, seed=1), drawn_image(40, 90, seed=2)]
    out = tiny_processor.image_processor(images, do_normalize=False)
    grids = embed.grids(out["image_sizes"])
    crops = reference_normalize(out["pixel_values"])
    expected = torch.cat([embed.global_views(crops, grids), crops]).to(dtype)
    assert torch.equal(embed.tower_batch(out["pixel_values"], grids, dtype), expected)  # uint8 in
    assert torch.equal(embed.tower_batch(crops, grids, dtype), expected)  # already-normalised floats in
