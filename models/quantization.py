"""Quantising the language model's linear layers to 4 or 8 bits with bitsandbytes (QLoRA), and undoing it.

Only the `nn.Linear` layers of the decoder (`model.layers.N.self_attn.*`, `model.layers.N.mlp.*`) are replaced:
they are 3.6 of the 4.1 billion parameters of Phi-3-V. The CLIP tower, the image projector, the token embeddings,
the norms and `lm_head` stay in the model's dtype, as in the QLoRA paper's practice of keeping the anchors of the
computation in 16 bits: the tower and the projector are small (0.33 B parameters), quantising them saves little and
would change the image features every answer depends on (and LoRA or full training of the projector and the tower
needs real weights), and the embeddings and `lm_head` are where a 4-bit rounding error reaches every token.

The layers are replaced in place, after loading (and after merging earlier adapters, which needs the real
weights: see train/core/model_loading.py), rather than through `from_pretrained(quantization_config=...)`: one path
serves loading a checkpoint and quantising a model merged in memory (DPO's starting point), on CPU and GPU alike,
and it covers exactly the decoder's linears. `bitsandbytes_config` gives the equivalent `BitsAndBytesConfig` for
users who load the base themselves.

CPU: bitsandbytes 0.50 runs NF4/FP4 (and int8) matmuls forward and backward on CPU. On CPUs with AVX512-BF16 it
repacks a 4-bit weight in place, the first time the layer runs in eval mode without gradients, into an
inference-only layout in bfloat16 (dropping double quantisation); later training forwards would then run the
inference kernel. Each layer here turns that repacking off, so the weights, their bytes and the numbers are the same
in training and evaluation.
"""

from __future__ import annotations

import re

import torch
from torch import nn

QUANTIZATIONS = ("nf4", "fp4", "int8")
# The decoder's linear layers in the hub layout; nothing under `vision_embed_tokens`, not `lm_head`.
LANGUAGE_LINEAR = re.compile(r"^(.*\.)?model\.layers\.\d+\.(self_attn|mlp)\.\w+$")
# What stays unquantised, in BitsAndBytesConfig's `llm_int8_skip_modules` spelling.
SKIPPED_MODULES = ("model.vision_embed_tokens", "lm_head")


def bitsandbytes_config(quantization: str, *, double_quant: bool, compute_dtype: torch.dtype):
    """The transformers `BitsAndBytesConfig` that quantises the same layers as `quantize_language_model_`."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIPPED_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(SKIPPED_MODULES),
    )


def quantization_tag(model_section) -> str:
    """'' for an unquantised model, else e.g. '+nf4-dq-bfloat16': what a cache of a model's outputs must key on."""
    quantization = model_section.quantization
    if quantization == "none":
        return ""
    if quantization == "int8":
        return "+int8"
    compute = model_section.quant_compute_dtype or model_section.dtype
    return f"+{quantization}{'-dq' if model_section.double_quant else ''}-{compute}"


def apply_quantization(model: nn.Module, model_section) -> nn.Module:
    """Quantise `model`'s decoder linears as a recipe's model section says (`quantization`, `double_quant`,
    `quant_compute_dtype`, else `dtype`); the model unchanged for `quantization: none`. The section is duck-typed:
    `models` sits below the `config` package."""
    if model_section.quantization == "none":
        return model
    compute = getattr(torch, model_section.quant_compute_dtype or model_section.dtype)
    quantize_language_model_(
        model, model_section.quantization, double_quant=model_section.double_quant, compute_dtype=compute
    )
    return model


def language_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and LANGUAGE_LINEAR.match(name)
    ]


def _quantized_layer(linear: nn.Linear, quantization: str, double_quant: bool, compute_dtype: torch.dtype):
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.data
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        layer._register_load_state_dict_pre_hook(_check_int8_state, with_module=True)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type=quantization,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type=quantization,
            module=layer,
        )
        layer.support_avx512bf16_for_cpu = False  # no in-place repacking on CPU (module docstring)
        layer._register_load_state_dict_pre_hook(_check_quant_state, with_module=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to("cpu" if device.type == "meta" else device)  # quantisation happens in this move


def _check_quant_state(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """Loading a 4-bit layer's state dict (a resumable checkpoint holds the whole model): its packed weight loads as
    a parameter; its quantisation constants (`weight.absmax`, `weight.quant_map`, ...) are not parameters, so
    torch would call them unexpected. They must equal this layer's own (the checkpoint was taken from the same
    quantised base); consume them, and report any that differ."""
    state = getattr(module.weight, "quant_state", None)
    own = state.as_dict(packed=True) if state is not None else {}
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        value, mine = state_dict.pop(key), own.get(key[len(prefix + "weight.") :])
        if isinstance(value, torch.Tensor) and (
            not isinstance(mine, torch.Tensor) or not torch.equal(value, mine)
        ):
            error_msgs.append(
                f"{key}: the checkpoint's 4-bit quantisation constants differ from this model's "
                "(a different base, or quantisation settings)"
            )


def _check_int8_state(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
):
    """Loading an int8 layer's state dict: bitsandbytes moves the row scales (`SCB`) from the weight to the layer's
    state at the first forward, after which its own loader refuses them ("non-quantized Linear8bitLt"). They must
    equal this layer's own; consume them here, and report any that differ."""
    scale = state_dict.pop(prefix + "SCB", None)
    state_dict.pop(prefix + "weight_format", None)
    mine = module.state.SCB if module.state.SCB is not None else getattr(module.weight, "SCB", None)
    if scale is not None and (mine is None or not torch.equal(scale.to(mine.device), mine)):
        error_msgs.append(
            f"{prefix}SCB: the checkpoint's int8 row scales differ from this model's (a different base)"
        )


def quantize_language_model_(
    model: nn.Module,
    quantization: str,
    *,
    double_quant: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace the decoder's `nn.Linear` layers by bitsandbytes NF4/FP4 (`Linear4bit`) or int8 (`Linear8bitLt`)
    layers holding the same weights, quantised; returns how many were replaced. Marks the model the way transformers'
    loader does (`is_loaded_in_4bit` / `is_loaded_in_8bit`), which is what PEFT reads to put its bitsandbytes LoRA
    layers on them."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    replaced = 0
    for name, linear in language_linears(model):
        layer = _quantized_layer(linear, quantization, double_quant, compute_dtype)
        model.set_submodule(name, layer)
        replaced += 1
    if not replaced:
        raise ValueError("no decoder linear layer (model.layers.N.self_attn / .mlp) found to quantise")
    setattr(model, "is_loaded_in_8bit" if quantization == "int8" else "is_loaded_in_4bit", True)
    return replaced


def is_quantized_layer(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes layer computes with, as a float32 tensor of the original shape."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    state = layer.state
    scale = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else state.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scale).float()


def dequantize_language_model_(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes layer by an `nn.Linear` holding its dequantised weight in `dtype` (the 4-bit
    rounded weights the adapters were trained against); returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_layer(module):
            continue
        weight = dequantized_weight(module)
        linear = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
        replaced += 1
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return replaced


def logical_numel(param: torch.Tensor) -> int:
    """How many weights a parameter holds: a 4-bit `Params4bit` packs two per byte, its `numel()` counts bytes."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers as they sit in memory, split into the quantised layers (their
    packed weights and quantisation constants) and everything else."""
    quantized = other = 0
    seen: set[int] = set()
    quantized_modules = {id(m) for m in model.modules() if _is_bnb(m)}
    for module in model.modules():
        in_quantized = id(module) in quantized_modules
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            if in_quantized:
                size += _quant_state_bytes(tensor)
                quantized += size
            else:
                other += size
    return {"quantized": quantized, "other": other, "total": quantized + other}


def _is_bnb(module: nn.Module) -> bool:
    try:
        return is_quantized_layer(module)
    except ImportError:
        return False


def _quant_state_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a bitsandbytes weight's quantisation constants (absmax, nested absmax, code, int8 row scales)."""
    total = 0
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        for value in (state.absmax, state.code, getattr(state, "offset", None)):
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += sum(v.numel() * v.element_size() for v in (nested.absmax, nested.code))
    scale = getattr(tensor, "SCB", None)
    if isinstance(scale, torch.Tensor):
        total += scale.numel() * scale.element_size()
    return total
