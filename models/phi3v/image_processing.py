"""The official Phi-3-V HD image transform, without torchvision, and image-token counts from (width, height) alone.

What the official processor does (docs/phi3v.md#hd-transform), reproduced step for step so that crops are bit-identical:
convert to RGB; transpose portrait images; pick the largest `scale` with `scale * ceil(scale / ratio) <= num_crops`;
resize to width `scale * 336` with PIL bilinear (what torchvision's resize does on a PIL image); pad the height with
white to a multiple of 336, centred; transpose back; scale to [0, 1] and normalise with the CLIP mean/std; cut into
336x336 crops in row-major order. The global view (a bicubic 336x336 downsample of the normalised canvas) is computed
on the model's device from these crops (`models.phi3v.vision`), so only the real crops travel: no global crop and no
zero-padding crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def hd_canvas_size(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """(canvas_width, canvas_height) of the padded HD canvas, both multiples of `crop_size`, from the size alone."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = scale * crop_size
    new_height = int(new_width / ratio)
    if new_height < 1:
        raise ValueError(
            f"image {width}x{height} is too elongated (aspect ratio {ratio:.0f}:1): its short side would resize to "
            f"0 pixels at num_crops={num_crops}; crop or pad the image first"
        )
    padded_height = math.ceil(new_height / crop_size) * crop_size
    return (padded_height, new_width) if transposed else (new_width, padded_height)


def crop_grid(width: int, height: int, num_crops: int, crop_size: int = 336) -> tuple[int, int]:
    """(rows, cols) of sub-crops the HD transform cuts an image of this size into."""
    canvas_w, canvas_h = hd_canvas_size(width, height, num_crops, crop_size)
    return canvas_h // crop_size, canvas_w // crop_size


def tokens_for_grid(rows: int, cols: int, crop_size: int = 336, patch_size: int = 14) -> int:
    """Image tokens of a crop grid: sub-crops with one separator per row, glb_GN, global view with its separators.

    With g = crop_size / patch_size / 2 merged patches per side (12 for 336/14):
    (rows * cols + 1) * g^2 + 1 + (rows + 1) * g  (docs/phi3v.md#image-token-count).
    """
    g = crop_size // patch_size // 2
    return (rows * cols + 1) * g * g + 1 + (rows + 1) * g


def num_image_tokens(
    width: int, height: int, num_crops: int = 16, crop_size: int = 336, patch_size: int = 14
) -> int:
    """Number of `<|image|>` slots an image of `width` x `height` pixels takes, without decoding any pixel."""
    rows, cols = crop_grid(width, height, num_crops, crop_size)
    return tokens_for_grid(rows, cols, crop_size, patch_size)


def hd_canvas(image: Image.Image, num_crops: int, crop_size: int = 336) -> Image.Image:
    """The padded RGB HD canvas, exactly as the official `HD_transform` builds it (transpose dance included: PIL's
    two-pass resize rounds between passes, so resizing the transposed image is not the same as resizing the original)."""
    if image.mode != "RGB":  # convert() copies even an RGB image; nothing below modifies `image` in place
        image = image.convert("RGB")
    canvas_w, canvas_h = hd_canvas_size(image.width, image.height, num_crops, crop_size)
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        canvas_w, canvas_h = canvas_h, canvas_w
    ratio = image.width / image.height
    new_width = canvas_w
    new_height = int(new_width / ratio)
    resized = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    top = (canvas_h - new_height) // 2
    canvas = Image.new("RGB", (canvas_w, canvas_h), (255, 255, 255))
    canvas.paste(resized, (0, top))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def canvas_to_crops(canvas: Image.Image, crop_size: int = 336) -> torch.Tensor:
    """uint8 crops (rows * cols, 3, crop_size, crop_size) in row-major order."""
    pixels = torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1)  # 3, H, W
    rows, cols = canvas.height // crop_size, canvas.width // crop_size
    crops = pixels.reshape(3, rows, crop_size, cols, crop_size).permute(1, 3, 0, 2, 4)
    return crops.reshape(rows * cols, 3, crop_size, crop_size).contiguous()


def normalize_uint8(
    pixels: torch.Tensor,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> normalised floats, with torchvision's ToTensor + Normalize arithmetic in float32
    (divide by 255, subtract the mean, divide by the std), so results are bit-identical to the official processor.

    Written once into `out` (float32 when None; any float dtype, e.g. the tower's bf16 batch) and computed in place:
    a float32 `out` is the only buffer touched; another dtype gets each leading slice computed in one float32
    scratch slice and rounded into `out`, which gives the same values as normalising in float32 and casting."""
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    if out.shape != pixels.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, pixels {tuple(pixels.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device)[:, None, None]
    if out.dtype == torch.float32:
        return out.copy_(pixels).div_(255).sub_(mean_t).div_(std_t)
    if pixels.dim() == 3:
        pixels, target = pixels[None], out[None]
    else:
        target = out
    scratch = torch.empty(pixels.shape[-3:], dtype=torch.float32, device=pixels.device)
    for i, image in enumerate(pixels.reshape(-1, *pixels.shape[-3:])):
        target.view(-1, *pixels.shape[-3:])[i].copy_(scratch.copy_(image).div_(255).sub_(mean_t).div_(std_t))
    return out


class Phi3VImageProcessor:
    """PIL images -> the real HD crops of each image (no global crop, no padding crops) and the canvas sizes.

    `__call__(images)` returns a dict:
      - `pixel_values`: (total_crops, 3, crop_size, crop_size), the sub-crops of all images concatenated in order;
        uint8 when `do_normalize=False` (4x fewer bytes for DataLoader workers; the model normalises on its device),
        else float32 normalised with the CLIP mean/std.
      - `image_sizes`: (num_images, 2) int64, the padded canvas [height, width] of each image, as the official
        processor reports it; image i has (height / crop_size) x (width / crop_size) crops.
      - `num_img_tokens`: list[int], the image slots each image takes.
    """

    def __init__(
        self,
        num_crops: int = 16,
        crop_size: int = 336,
        patch_size: int = 14,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_normalize: bool = True,
    ):
        self.num_crops = num_crops
        self.crop_size = crop_size
        self.patch_size = patch_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.do_normalize = do_normalize

    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        return num_image_tokens(width, height, num_crops or self.num_crops, self.crop_size, self.patch_size)

    def __call__(
        self, images: Sequence[Image.Image], num_crops: int | None = None, do_normalize: bool | None = None
    ) -> dict:
        num_crops = num_crops or self.num_crops
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        crops, sizes, counts = [], [], []
        for image in images:
            canvas = hd_canvas(image, num_crops, self.crop_size)
            crops.append(canvas_to_crops(canvas, self.crop_size))
            sizes.append((canvas.height, canvas.width))
            rows, cols = canvas.height // self.crop_size, canvas.width // self.crop_size
            counts.append(tokens_for_grid(rows, cols, self.crop_size, self.patch_size))
        if crops:
            pixel_values = crops[0] if len(crops) == 1 else torch.cat(crops)
        else:
            pixel_values = torch.empty(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8)
        if do_normalize:
            pixel_values = normalize_uint8(pixel_values, self.image_mean, self.image_std)
        image_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
        return {"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": counts}

    def to_dict(self) -> dict:
        """The hub's `preprocessor_config.json` fields (plus crop/patch size when they differ from 336/14)."""
        out = {
            "image_processor_type": "Phi3VImageProcessor",
            "processor_class": "Phi3VProcessor",
            "num_crops": self.num_crops,
            "num_img_tokens": (self.crop_size // self.patch_size // 2) ** 2,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }
        if (self.crop_size, self.patch_size) != (336, 14):
            out.update(crop_size=self.crop_size, patch_size=self.patch_size)
        return out

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> Phi3VImageProcessor:
        """From a folder's (or hub id's) `preprocessor_config.json`; `num_crops=` overrides the file's."""
        import json
        from pathlib import Path

        if Path(path).is_dir():
            file = Path(path) / "preprocessor_config.json"
        else:
            from huggingface_hub import hf_hub_download

            file = Path(
                hf_hub_download(str(path), "preprocessor_config.json", revision=kwargs.get("revision"))
            )
        processor = cls.from_dict(json.loads(file.read_text()) if file.is_file() else {})
        if kwargs.get("num_crops") is not None:
            processor.num_crops = int(kwargs["num_crops"])
        return processor

    @classmethod
    def from_dict(cls, config: dict) -> Phi3VImageProcessor:
        return cls(
            num_crops=int(config.get("num_crops", 16)),
            crop_size=int(config.get("crop_size", 336)),
            patch_size=int(config.get("patch_size", 14)),
            image_mean=config.get("image_mean", CLIP_MEAN),
            image_std=config.get("image_std", CLIP_STD),
        )
