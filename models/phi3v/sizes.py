"""The real Phi-3-Vision-128K and Phi-3.5-vision geometries as configs, for benchmarks and memory checks with random
weights (no download): every field from docs/phi3v.md#config-fields, CLIP ViT-L/14-336 from `CLIP_VIT_L_336`.

The two models differ only in `sliding_window` and their LongRoPE factor arrays (docs/phi3v.md#rope-scaling-longrope).
The arrays here are placeholders (all 1.0, 48 each): they change no shape and no FLOP, only the rotation values; a
model meant to match the hub's numerics must load the hub's `config.json` instead.
"""

from __future__ import annotations

from .configuration import Phi3VConfig

HUB_FIELDS = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    vocab_size=32064,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=32000,
    tie_word_embeddings=False,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attention_dropout=0.0,
)
SIZES = {
    "phi3v": dict(sliding_window=131072, num_crops=16),  # Phi-3-vision-128k-instruct
    "phi35v": dict(sliding_window=262144, num_crops=4),  # Phi-3.5-vision-instruct (multi-image)
}
PARAMETERS = 4_146_621_440  # docs/phi3v.md#checkpoint-keys-and-sizes: either model


def full_size_config(name: str = "phi3v", **overrides) -> Phi3VConfig:
    """The config of `name` ('phi3v' or 'phi35v') with placeholder RoPE factors; `overrides` replace fields
    (e.g. `num_hidden_layers=2` for a cut-down model of the same widths)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; one of {sorted(SIZES)}")
    half_head = HUB_FIELDS["hidden_size"] // HUB_FIELDS["num_attention_heads"] // 2
    fields = {
        **HUB_FIELDS,
        "sliding_window": SIZES[name]["sliding_window"],
        "rope_scaling": {"type": "su", "short_factor": [1.0] * half_head, "long_factor": [1.0] * half_head},
    }
    return Phi3VConfig(**{**fields, **overrides})
