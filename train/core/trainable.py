"""Which parameters train, and how: the vision tower, the projector and the language model, each its own way.

Parts are told apart by parameter name (the hub layout): `vision_embed_tokens.img_processor.*` is the CLIP tower,
`vision_embed_tokens.{img_projection,glb_GN,sub_GN}` the projector, everything else the language model. LoRA goes
through peft on explicit targets (peft has no default for Phi-3-V: docs/phi3v.md#peft-default-targets); a part trained in full next to
LoRA is saved in the adapter as peft `modules_to_save`. Also here: fp32 master copies of what trains, the per-part
report, and the preflight check that one backward reaches every trained part.

A quantised language model (QLoRA, models/quantization.py) goes through the same path: PEFT puts its bitsandbytes
LoRA layers on the 4-bit or 8-bit linears. This is the equivalent of PEFT's `prepare_model_for_kbit_training` minus
its one cast: that function freezes everything (done here), turns on gradient checkpointing (done here when the
recipe asks) and casts every 16-bit parameter that is not 4-bit to float32, the CLIP tower, the embeddings and
`lm_head` included (+1 GB on Phi-3-V). Those stay in model.dtype here, as they do for LoRA on an unquantised base:
autocast runs the matmuls in 16 bits anyway, Phi-3's RMSNorm computes in float32 internally, and what trains is kept
in float32 by `upcast_trainable_`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace

import torch
from peft import LoraConfig, get_peft_model

from config import LoraSection, ModelSection, TrainSection
from models.quantization import logical_numel

VISION = "vision"
PROJECTOR = "projector"
LANGUAGE = "language"
PARTS = (VISION, PROJECTOR, LANGUAGE)


def part_of(name: str) -> str:
    if "vision_embed_tokens.img_processor." in name:
        return VISION
    if "vision_embed_tokens." in name:
        return PROJECTOR
    return LANGUAGE


def lora_target_regex(model, model_section: ModelSection, lora: LoraSection) -> str:
    """One regex over module names: LM linears under `model.layers`, and CLIP linears of the layers that run."""
    patterns = []
    if model_section.language == "lora":
        names = "|".join(re.escape(t) for t in lora.target_modules)
        patterns.append(rf"(.*\.)?model\.layers\.\d+\.(self_attn|mlp)\.({names})")
    if model_section.vision == "lora":
        names = "|".join(re.escape(t) for t in lora.vision_target_modules)
        used = model.model.vision_embed_tokens.img_processor.vision_model.num_layers_run
        layers = "|".join(str(i) for i in range(used))  # the last CLIP layer never runs: no adapter there
        patterns.append(
            rf"(.*\.)?img_processor\.vision_model\.encoder\.layers\.({layers})\.(self_attn|mlp)\.({names})"
        )
    return "^(" + "|".join(patterns) + ")$"


def configure_trainable(model, model_section: ModelSection, lora: LoraSection, seed: int = 0):
    """Freeze, add LoRA, unfreeze full parts; returns the model to train (a PeftModel when LoRA is used).

    The adapter's initial weights come from `seed` alone, not from whatever consumed the global RNG before (a
    DataLoader iterator draws from it, so an eval pass or a reference-log-prob pass would otherwise change them)."""
    model.requires_grad_(False)
    if model_section.language == "full" and (
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    ):
        raise ValueError(
            "model.language = 'full' on a quantised language model: its weights are frozen bitsandbytes "
            "storage. Set model.language: lora, or model.quantization: none"
        )
    uses_lora = "lora" in (model_section.language, model_section.vision)
    full_parts = {
        p
        for p, mode in [
            (VISION, model_section.vision),
            (PROJECTOR, model_section.projector),
            (LANGUAGE, model_section.language),
        ]
        if mode == "full"
    }
    if model_section.gradient_checkpointing:
        model.activation_checkpointing_enable()
    layers_run = model.model.vision_embed_tokens.img_processor.vision_model.num_layers_run
    if uses_lora:
        modules_to_save = []
        if PROJECTOR in full_parts:
            modules_to_save.append("img_projection")
        if VISION in full_parts:
            modules_to_save.append("img_processor")
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_target_regex(model, model_section, lora),
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            modules_to_save=modules_to_save or None,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if part_of(name) in full_parts and "lora_" not in name:
            if never_runs(
                name, layers_run
            ):  # peft makes a whole modules_to_save copy trainable: undo it here
                param.requires_grad_(False)
            elif not uses_lora or "modules_to_save" in name:
                param.requires_grad_(True)
    return model


CLIP_LAYER = re.compile(
    r"vision_model\.encoder\.layers\.(\d+)\."
)  # also inside peft's modules_to_save wrapper


def never_runs(name: str, layers_run: int) -> bool:
    """CLIP's post_layernorm and the layers after the feature layer (index >= `layers_run`) are in the checkpoint but
    never computed: trained in full they would get no gradient (and DDP would stop on unused parameters)."""
    layer = CLIP_LAYER.search(name)
    return "post_layernorm" in name or (layer is not None and int(layer.group(1)) >= layers_run)


def parameter_groups(model, train: TrainSection) -> list[dict]:
    """AdamW groups: one per part that trains, each with its own learning rate; no decay on norms, biases, GN."""
    lrs = {LANGUAGE: train.lr, VISION: train.lr_vision or train.lr, PROJECTOR: train.lr_projector or train.lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim < 2 or "norm" in name
            groups[(part_of(name), no_decay)].append(param)
    return [
        {
            "params": params,
            "lr": lrs[part],
            "weight_decay": 0.0 if no_decay else train.weight_decay,
            "part": part,
        }
        for (part, no_decay), params in sorted(groups.items())
    ]


def trainable_counts(model) -> dict[str, dict[str, int]]:
    """Per part: trainable and total parameter counts (a LoRA adapter counts towards the part it adapts; a 4-bit
    weight counts its weights, not its packed bytes). A part trained in full beside LoRA is held twice by PEFT
    (`modules_to_save`: the frozen original and the trained copy): its total counts it once."""
    counts = {p: {"trainable": 0, "total": 0} for p in PARTS}
    for name, param in model.named_parameters():
        part = counts[part_of(name)]
        if ".modules_to_save." not in name:  # the trained copy of an `original_module` counted already
            part["total"] += logical_numel(param)
        if param.requires_grad:
            part["trainable"] += param.numel()
    return counts


def trained_parts(model_section: ModelSection) -> set[str]:
    modes = {
        VISION: model_section.vision,
        PROJECTOR: model_section.projector,
        LANGUAGE: model_section.language,
    }
    return {part for part, mode in modes.items() if mode != "frozen"}


def upcast_trainable_(model) -> None:
    """fp32 master copies of the trained parameters; the frozen base stays in the recipe's dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def report_trainable(model) -> str:
    counts = trainable_counts(model)
    lines = [
        f"  {part:<9} trainable {c['trainable']:>13,} of {c['total']:>13,}" for part, c in counts.items()
    ]
    return "trainable parameters per part:\n" + "\n".join(lines)


def check_gradients(model, expected_parts: set[str]) -> None:
    """After one backward: every part meant to train must have received a non-zero gradient."""
    seen = {part: False for part in PARTS}
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is not None and bool(param.grad.abs().sum() > 0):
            seen[part_of(name)] = True
    missing = sorted(p for p in expected_parts if not seen[p])
    if missing:
        raise RuntimeError(
            f"preflight: no gradient reached the {', '.join(missing)} part(s) that the recipe trains; the first "
            f"batch may hold no image (a text-only batch gives the vision parts no gradient), or those parameters "
            f"are disconnected from the loss"
        )


def dpo_parts(model_section: ModelSection) -> ModelSection:
    """DPO trains LoRA only (the reference is the adapter-disabled network): the language model always, the tower
    when the recipe puts LoRA there; the projector and every full part stay frozen."""
    return replace(
        model_section,
        language="lora",
        vision="lora" if model_section.vision == "lora" else "frozen",
        projector="frozen",
    )
