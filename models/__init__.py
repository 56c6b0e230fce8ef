"""Model loading: one small registry from a checkpoint's `model_type` to the loader of its family.

Phi-3-V checkpoints (`model_type: phi3_v`) load natively (`models.phi3v`); any other image-text-to-text model of
transformers goes through transformers' Auto classes, never with remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .phi3v import Phi3VForCausalLM, Phi3VProcessor
from .phi3v.processing import resolve_folder

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _load_phi3v(folder: Path, *, dtype, attn_implementation, num_crops):
    model = Phi3VForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation)
    return model, Phi3VProcessor.from_pretrained(folder, num_crops=num_crops)


def _load_auto(folder: Path, *, dtype, attn_implementation, num_crops):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=False
    )
    return model, AutoProcessor.from_pretrained(str(folder), trust_remote_code=False)


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
    loader = LOADERS.get(model_type, _load_auto)
    return loader(folder, dtype=DTYPES[dtype], attn_implementation=attn_implementation, num_crops=num_crops)
