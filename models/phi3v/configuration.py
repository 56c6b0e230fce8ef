"""Phi-3-Vision configuration: transformers' own `Phi3Config` plus the hub's two vision fields.

Reads the hub `config.json` of Phi-3-vision-128k-instruct and Phi-3.5-vision-instruct unchanged, and writes a
`config.json` that the official remote code and vLLM accept (see `to_dict`).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import CLIPVisionConfig, Phi3Config

# The official code builds this CLIP whenever `img_processor.model_name` is clip-vit-large-patch14-336
# (image_embedding_phi3_v.py, CLIP_VIT_LARGE_PATCH14_336_CONFIG); the checkpoint carries its fine-tuned weights.
CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    attention_dropout=0.0,
)

DEFAULT_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}
DEFAULT_IMG_PROCESSOR = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": 144,
}
IMAGE_TOKEN = "<|image|>"


class Phi3VConfig(Phi3Config):
    """`Phi3Config` with `embd_layer` and `img_processor`, as in the hub's `config.json`.

    `img_processor` may hold a `vision_config` dict (CLIPVisionConfig fields): tiny test models use it for a small
    CLIP. Without it the tower is CLIP ViT-L/14-336, as in the official code. `layer_idx` (default -2, the official
    default) picks the CLIP hidden state the features come from.
    """

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None
    image_token_id: int = 32044
    end_token_ids: list[int] | None = (
        None  # generation stops here; None -> <|end|> 32007 and <|endoftext|> 32000
    )

    def __post_init__(self, **kwargs):
        # The hub file says `_attn_implementation: flash_attention_2`; a file must not pick a kernel that may not be
        # installed (docs/phi3v.md#flash-attention-at-load). The loader's `attn_implementation` argument decides (default sdpa).
        kwargs.pop("_attn_implementation", None)
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        order = self.embd_layer["hd_transform_order"]
        if order != "sub_glb" or not self.embd_layer["use_hd_transform"]:
            raise ValueError(
                f"embd_layer: only the HD transform with order 'sub_glb' exists in Phi-3-V, got {order!r}"
            )
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, default_theta=10_000.0, ignore_keys=None, **kwargs):
        # The hub config says rope_scaling {"type": "su", ...}. transformers 5.24 renames su -> longrope only after
        # standardising, which then misses original_max_position_embeddings (docs/phi3v.md#rope-scaling-longrope): rename first.
        rope_scaling = kwargs.get("rope_scaling")
        if isinstance(rope_scaling, dict) and rope_scaling.get("type", rope_scaling.get("rope_type")) in (
            "su",
            "longrope",
        ):
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "type"}
            rope_scaling["rope_type"] = "longrope"
            rope_scaling.setdefault("original_max_position_embeddings", self.original_max_position_embeddings)
            kwargs["rope_scaling"] = rope_scaling
        return super().convert_rope_params_to_dict(
            default_theta=default_theta, ignore_keys=ignore_keys, **kwargs
        )

    @property
    def vision_config(self) -> CLIPVisionConfig:
        """The CLIP tower's config (ViT-L/14-336 unless `img_processor.vision_config` says otherwise)."""
        fields = {**CLIP_VIT_L_336, **self.img_processor.get("vision_config", {})}
        config = CLIPVisionConfig(**fields)
        config._attn_implementation = self._attn_implementation
        return config

    @property
    def vision_layer_idx(self) -> int:
        return int(self.img_processor.get("layer_idx", -2))

    def to_dict(self) -> dict[str, Any]:
        """The hub's own field layout: `rope_scaling` {type su, short_factor, long_factor}, as the official
        `Phi3VConfig._rope_scaling_validation` demands (exactly those three keys) and vLLM reads."""
        out = super().to_dict()
        rope = out.pop("rope_parameters", None) or {}
        out["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
                "type": "su",
            }
        else:
            out["rope_scaling"] = None
        if out.get("end_token_ids") is None:
            out.pop("end_token_ids", None)
        if self.image_token_id == 32044:
            out.pop("image_token_id")  # the hub's own id: keep the file exactly in the hub's shape
        out["architectures"] = ["Phi3VForCausalLM"]
        return copy.deepcopy(out)
