"""Phi-3-V's image path: the CLIP tower, the HD feature layout, the separators and the projector.

Module names follow the hub checkpoint (`vision_embed_tokens.img_processor.vision_model.*`, `glb_GN`, `sub_GN`,
`img_projection.{0,2}`), so the hub's keys load with no renaming. The CLIP pieces are transformers' own
(`CLIPVisionEmbeddings`, `CLIPEncoderLayer`); the official model reads the hidden state of layer `layer_idx` (-2), so
only the layers up to it run: the last CLIP layer and `post_layernorm` are kept for the checkpoint's sake, frozen, and
never computed (docs/phi3v.md#clip-feature-layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

from .image_processing import normalize_uint8
from .sequence_parallel import SequenceParallel, encode_rows


class CLIPTrunk(nn.Module):
    """CLIP ViT without a head: `embeddings`, `pre_layrnorm`, `encoder.layers`, `post_layernorm` (unused)."""

    def __init__(self, config: CLIPVisionConfig, num_layers_run: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.num_layers_run = num_layers_run
        for layer in self.encoder.layers[num_layers_run:]:
            layer.requires_grad_(False)
        self.post_layernorm.requires_grad_(False)

    def forward(self, pixel_values_NCHW: torch.Tensor) -> torch.Tensor:
        """Patch features of the selected layer, CLS dropped: (N, num_patches, hidden)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values_NCHW))
        for layer in self.encoder.layers[: self.num_layers_run]:
            hidden = layer(hidden, None)
        return hidden[:, 1:]


class CLIPHolder(nn.Module):
    """Holds the trunk under the name `vision_model`, as the hub's 4.x `CLIPVisionModel` did."""

    def __init__(self, config: CLIPVisionConfig, num_layers_run: int):
        super().__init__()
        self.vision_model = CLIPTrunk(config, num_layers_run)

    def forward(self, pixel_values_NCHW: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values_NCHW)


def merge_2x2(features_NLC: torch.Tensor) -> torch.Tensor:
    """(N, P*P, C) patch features -> (N, P/2, P/2, 4C): each 2x2 block concatenated as (r0c0, r0c1, r1c0, r1c1)."""
    n, length, c = features_NLC.shape
    p = int(length**0.5)
    blocks = features_NLC.reshape(n, p // 2, 2, p // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, p // 2, p // 2, 4 * c)


def tile_crops(merged_NggC: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, g, g, C) crops in row-major order -> one (rows*g, cols*g, C) grid."""
    _, g, _, c = merged_NggC.shape
    grid = merged_NggC.reshape(rows, cols, g, g, c).permute(0, 2, 1, 3, 4)
    return grid.reshape(rows * g, cols * g, c)


class Phi3VImageEmbedding(nn.Module):
    """Images -> one sequence of LM-width features per image, in the official order:
    [sub-crop grid, a `sub_GN` after every row] + [`glb_GN`] + [global view grid, a `sub_GN` after every row].

    Under sequence parallelism (`sequence_parallel` splitting) the tower's rows are shared out over the group and
    gathered (models/phi3v/sequence_parallel.py `encode_rows`)."""

    sequence_parallel: SequenceParallel | None = None

    def __init__(self, config):
        super().__init__()
        vision_config = config.vision_config
        layer_idx = config.vision_layer_idx
        total = vision_config.num_hidden_layers
        num_layers_run = total + 1 + layer_idx if layer_idx < 0 else layer_idx
        if not 1 <= num_layers_run <= total:
            raise ValueError(f"img_processor.layer_idx={layer_idx} selects no CLIP layer of {total}")
        self.img_processor = CLIPHolder(vision_config, num_layers_run)
        self.crop_size = vision_config.image_size
        self.grid = (
            vision_config.image_size // vision_config.patch_size // 2
        )  # merged 2x2: features per crop side
        dim = 4 * vision_config.hidden_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def global_views(self, crops: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """The official global view: a bicubic (no antialias) downsample of each normalised canvas to one crop."""
        s = self.crop_size
        views, start = [], 0
        for rows, cols in grids:
            canvas = crops[start : start + rows * cols].reshape(rows, cols, 3, s, s)
            canvas = canvas.permute(2, 0, 3, 1, 4).reshape(1, 3, rows * s, cols * s)
            views.append(F.interpolate(canvas, size=(s, s), mode="bicubic", align_corners=False))
            start += rows * cols
        return torch.cat(views)

    def tower_batch(
        self, pixel_values: torch.Tensor, grids: list[tuple[int, int]], dtype: torch.dtype
    ) -> torch.Tensor:
        """[global views, crops] in the tower's dtype, each value written once into that buffer: crops are normalised
        in float32 one image at a time (its global view needs the float32 canvas to match the official one) and
        rounded into place. Equal to `cat([global_views(c), c]).to(dtype)` with `c` the crops normalised in float32
        (`normalize_uint8` for uint8 crops; float crops are taken as normalised already)."""
        n = len(grids)
        batch = torch.empty(
            (n + pixel_values.shape[0], *pixel_values.shape[1:]), dtype=dtype, device=pixel_values.device
        )
        start = 0
        for i, (rows, cols) in enumerate(grids):
            crops_in = pixel_values[start : start + rows * cols]
            target = batch[n + start : n + start + rows * cols]
            if crops_in.dtype == torch.uint8:
                crops = normalize_uint8(crops_in, out=target if dtype == torch.float32 else None)
            else:
                crops = crops_in.to(torch.float32)
            batch[i : i + 1].copy_(self.global_views(crops, [(rows, cols)]))
            if crops.data_ptr() != target.data_ptr():
                target.copy_(crops)
            start += rows * cols
        return batch

    def grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        return [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]

    def per_image(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """`forward`'s features split into one (num_image_tokens_i, hidden) tensor per image."""
        features = self(pixel_values, image_sizes)
        return list(features.split([self.num_tokens(rows, cols) for rows, cols in self.grids(image_sizes)]))

    def num_tokens(self, rows: int, cols: int) -> int:
        """Features of one image of rows x cols crops: both grids with a separator after each row, and glb_GN."""
        g = self.grid
        return rows * g * (cols * g + 1) + 1 + g * (g + 1)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values: (total_crops, 3, S, S) sub-crops of all images, uint8 or normalised float;
        image_sizes: (num_images, 2) canvas [H, W]. Returns the images' features, one after the other:
        (sum of num_image_tokens_i, hidden) (`per_image` splits them). One tensor: the hooks ZeRO-3 puts on a
        module's outputs then fire once per call, however many images the batch holds (docs/distributed.md#zero-3)."""
        grids = self.grids(image_sizes)
        expected = sum(r * c for r, c in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} crops but image_sizes {image_sizes.tolist()} need "
                f"{expected}: pass the processor's pixel_values and image_sizes together"
            )
        tower_dtype = self.img_processor.vision_model.embeddings.patch_embedding.weight.dtype
        batch = self.tower_batch(pixel_values, grids, tower_dtype)
        sp = self.sequence_parallel
        patches = (
            encode_rows(self.img_processor, batch, sp)
            if sp is not None and sp.active
            else self.img_processor(batch)
        )
        merged = merge_2x2(patches)  # (num_images + total_crops, g, g, 4C)
        global_merged, sub_merged = merged[: len(grids)], merged[len(grids) :]
        sequences, start = [], 0
        for i, (rows, cols) in enumerate(grids):
            sub = self.with_row_separators(tile_crops(sub_merged[start : start + rows * cols], rows, cols))
            glb = self.with_row_separators(global_merged[i])
            sequences.append(torch.cat([sub, self.glb_GN[0].to(sub.dtype), glb]))
            start += rows * cols
        # Features stay in the tower's dtype: the projector runs in the same dtype, or under autocast in training.
        return self.img_projection(torch.cat(sequences))

    def with_row_separators(self, grid_HWC: torch.Tensor) -> torch.Tensor:
        """Append `sub_GN` after every row of a (H, W, C) grid -> (H * (W + 1), C)."""
        h, _, c = grid_HWC.shape
        separators = self.sub_GN[0].to(grid_HWC.dtype).expand(h, 1, c)
        return torch.cat([grid_HWC, separators], dim=1).reshape(-1, c)
