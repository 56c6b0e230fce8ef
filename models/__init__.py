"""Model loading: one small registry from a checkpoint's `model_type` to the loader of its family.

Phi-3-V checkpoints (`model_type: phi3_v`) load natively (`models.phi3v`), never with remote code. Rendering,
collation, the trainable-parts logic and the DPO loss rely on Phi-3-V's `encode_prompt` and `vision_embed_tokens`,
so no other family is offered: a checkpoint of another `model_type` is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.phi3v import Phi3VForCausalLM, Phi3VProcessor
from models.phi3v.processing import resolve_folder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _load_phi3v(folder: Path, *, dtype, attn_implementation, num_crops):
    model = Phi3VForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation
    )
    return model, Phi3VProcessor.from_pretrained(folder, num_crops=num_crops)


LOADERS = {"phi3_v": _load_phi3v}


def load(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str = "bfloat16",
    attn_implementation: str = "sdpa",
    num_crops: int | None = None,
):
    """(model, processor) from a hub id or a local folder. Hub ids are fetched with huggingface_hub."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = resolve_folder(name_or_path, revision)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ValueError(f"{name_or_path}: no config.json in {folder}; is this a model checkpoint folder?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in LOADERS:
        raise ValueError(
            f"{name_or_path}: model_type {model_type!r} is not supported; this project trains "
            f"{', '.join(sorted(LOADERS))} checkpoints (Phi-3-Vision, Phi-3.5-vision)"
        )
    loader = LOADERS[model_type]
    return loader(folder, dtype=DTYPES[dtype], attn_implementation=attn_implementation, num_crops=num_crops)
