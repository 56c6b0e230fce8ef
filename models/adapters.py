"""LoRA adapters in a form the PEFT releases users run can read, and the one way this project applies them.

`make_portable(folder, base_id=..., local_base=...)` rewrites an adapter peft 0.21 just saved:

- `adapter_config.json` keeps only the keys peft 0.11.1's `LoraConfig` knows (newer ones, e.g.
  `alora_invocation_tokens`, make 0.11 raise `TypeError` in `LoraConfig(**config)`); a new key that holds a
  non-default value is refused (the adapter would mean something else on old PEFT);
- `target_modules` becomes the explicit list of the adapted module names (old PEFT matches a list by name suffix);
- `base_model_name_or_path` is the base's hub id; the local folder trained on is recorded in `base_model.json`;
- parts trained in full (peft `modules_to_save`, e.g. the projector) leave the adapter: they go to
  `full_weights.safetensors` under the hub checkpoint's key names, and `modules_to_save` is dropped, because
  the official model's image path cannot run through peft's `ModulesToSaveWrapper`
  (`'ModulesToSaveWrapper' object has no attribute 'bias'`). Load them into the base before the adapter:
  `apply_adapter` does; with plain PEFT, `model.load_state_dict(load_file(full_weights), strict=False)` first.

Oldest PEFT supported: 0.11.1 (docs/export.md#adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "full_weights.safetensors"
BASE_RECORD = "base_model.json"
# Environment override of an adapter's base (a local copy of the hub model, e.g. offline): see docs/export.md#adapters.
BASE_OVERRIDE_ENV = "PHI3V_BASE_MODEL"

# peft 0.11.1: PeftConfigMixin, PeftConfig and LoraConfig fields (peft/config.py, peft/tuners/lora/config.py).
PEFT_011_LORA_KEYS = frozenset(
    {
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "r",
        "target_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "megatron_config",
        "megatron_core",
        "loftq_config",
        "use_dora",
        "layer_replication",
    }
)


def _lora_defaults() -> dict:
    import dataclasses

    from peft import LoraConfig

    return {
        f.name: f.default
        if f.default is not dataclasses.MISSING
        else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        for f in dataclasses.fields(LoraConfig)
    }


def portable_config(config: dict, *, target_modules: list[str], base_id: str) -> dict:
    """The adapter config peft >= 0.11.1 reads, meaning the same as `config`."""
    dropped = {k: v for k, v in config.items() if k not in PEFT_011_LORA_KEYS}
    defaults = _lora_defaults()
    meaningful = {
        k: v
        for k, v in dropped.items()
        if k != "peft_version" and v not in (None, False, [], {}) and v != defaults.get(k)
    }
    if meaningful:
        raise ValueError(
            f"the adapter uses options peft 0.11 does not know: {meaningful}; it cannot be made portable"
        )
    out = {k: v for k, v in config.items() if k in PEFT_011_LORA_KEYS}
    out.update(
        target_modules=sorted(target_modules),
        base_model_name_or_path=base_id,
        modules_to_save=None,
        revision=None,
    )
    return out


def make_portable(
    folder: Path,
    *,
    base_id: str,
    local_base: str | None = None,
    revision: str | None = None,
    applies_after: list[str] | None = None,
) -> Path:
    """Rewrite the adapter in `folder` (see the module docstring). Idempotent."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    weights = load_file(folder / ADAPTER_WEIGHTS)
    lora, full = {}, {}
    for key, value in weights.items():
        if ".modules_to_save." in key or (config.get("modules_to_save") and "lora_" not in key):
            # base_model.model.<module>.modules_to_save.<rest> -> the hub key <module>.<rest>
            full[
                key.removeprefix("base_model.model.")
                .replace(".modules_to_save.default.", ".")
                .replace(".modules_to_save.", ".")
            ] = value
        else:
            lora[key] = value
    targets = sorted(
        {key.removeprefix("base_model.model.").split(".lora_")[0] for key in lora if ".lora_" in key}
    )
    if not targets:
        targets = list(config["target_modules"]) if isinstance(config["target_modules"], list) else []
    if full:
        existing = load_file(folder / FULL_WEIGHTS) if (folder / FULL_WEIGHTS).is_file() else {}
        save_file(
            {**existing, **{k: v.contiguous() for k, v in full.items()}},
            folder / FULL_WEIGHTS,
            metadata={"format": "pt"},
        )
        save_file(
            {k: v.contiguous() for k, v in lora.items()}, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"}
        )
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(portable_config(config, target_modules=targets, base_id=base_id), indent=2, sort_keys=True)
        + "\n",
        encoding="utf-8",
    )
    record = {
        "base_model_name_or_path": base_id,
        "revision": revision,
        "local_path": local_base,
        "full_weights": FULL_WEIGHTS if (folder / FULL_WEIGHTS).is_file() else None,
        "applies_after": list(applies_after or []),
    }
    (folder / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return folder


def full_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / FULL_WEIGHTS
    return load_file(path) if path.is_file() else {}


def apply_adapter(model, folder: Path, *, merge: bool):
    """`model` with the adapter of `folder`: its full-trained parts loaded first, then the LoRA (merged when asked).
    The one way this project applies an adapter (training stages, eval, export)."""
    from peft import PeftModel

    full = full_weights(folder)
    if full:
        missing = set(full) - set(model.state_dict())
        if missing:
            raise ValueError(f"{folder}/{FULL_WEIGHTS} holds weights the model lacks: {sorted(missing)[:3]}")
        model.load_state_dict(full, strict=False)
    model = PeftModel.from_pretrained(model, str(folder))
    return model.merge_and_unload() if merge else model


def adapter_base(folder: Path) -> str:
    """Where to load an adapter's base from: $PHI3V_BASE_MODEL, else the local folder recorded at training time
    when it still exists, else `base_model_name_or_path` (the hub id)."""
    if os.environ.get(BASE_OVERRIDE_ENV):
        return os.environ[BASE_OVERRIDE_ENV]
    record_file = Path(folder) / BASE_RECORD
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record.get("local_path") and Path(record["local_path"]).is_dir():
            return record["local_path"]
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
