"""Every rule across a recipe's fields, in one place; every entry point runs them (through `config.parse`).

Each problem is one line: key path, value, what is wrong and its consequence, and the fix. Types and ranges of single
fields are checked while parsing (`config.parse`); the rules here need a well-typed recipe. One rule needs the
model's image geometry (the smallest image must fit in data.max_length): it is known without a download for the
demo's tiny model, the two Phi-3-V hub ids and local Phi-3-V folders.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from config.schema import (
    LABEL_SMOOTHING_LOSSES,
    RESUME_KEYS,
    STAGE_FORMATS,
    STAGE_ORDER,
    DataSection,
    ModelSection,
    Recipe,
)
from models.phi3v.image_processing import num_image_tokens
from models.phi3v.tiny import DEMO_MODEL
from runtime.user_errors import REDACTED, SECRET_KEY, redact_secrets

PHI3V_HUB_IDS = frozenset({"microsoft/Phi-3-vision-128k-instruct", "microsoft/Phi-3.5-vision-instruct"})
PHI3V_GEOMETRY = (336, 14)  # (crop_size, patch_size) of the real CLIP tower
PHI3V_HEADS = 32  # attention heads = key/value heads of both hub models (no grouped-query attention)


@functools.cache
def fewest_image_tokens(num_crops: int, crop_size: int, patch_size: int) -> int:
    """The fewest image slots any image takes. The count depends on the aspect ratio alone; ratios from 1:1 to
    (num_crops + 2):1 in steps of 1/1000 meet every crop grid (beyond, the grid stays 1 x num_crops), and a portrait
    image takes what its landscape mirror takes. A square is not the minimum: at 16 crops a square gets a 4 x 4 grid
    (2,509 tokens at 336/14), a 17:2 strip a 1 x 8 one (1,321 tokens)."""
    height = 1000
    return min(
        num_image_tokens(width, height, num_crops, crop_size, patch_size)
        for width in range(height, height * (num_crops + 2))
    )


def image_geometry(model: ModelSection) -> tuple[int, int] | None:
    """(crop_size, patch_size) of the recipe's model where known without a download; None for other models."""
    if model.name_or_path == "tiny":
        return DEMO_MODEL["crop_size"], DEMO_MODEL["patch_size"]
    if model.name_or_path in PHI3V_HUB_IDS:
        return PHI3V_GEOMETRY
    config = Path(model.name_or_path) / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None
        return PHI3V_GEOMETRY if model_type == "phi3_v" else None
    return None


def attention_heads(model: ModelSection) -> int | None:
    """The language model's attention heads where known without a download; None for other models."""
    if model.name_or_path == "tiny":
        return DEMO_MODEL["num_attention_heads"]
    if model.name_or_path in PHI3V_HUB_IDS:
        return PHI3V_HEADS
    config = Path(model.name_or_path) / "config.json"
    if config.is_file():
        try:
            heads = json.loads(config.read_text(encoding="utf-8")).get("num_attention_heads")
        except (OSError, ValueError):
            return None
        return heads if isinstance(heads, int) else None
    return None


def min_image_tokens(model: ModelSection) -> int | None:
    geometry = image_geometry(model)
    return fewest_image_tokens(model.num_crops, *geometry) if geometry else None


def show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def issue(path: str, value: Any, what: str, fix: str) -> str:
    """One problem as one line: key path, value, what is wrong and its consequence, and the fix."""
    shown = REDACTED if SECRET_KEY.search(str(path).rsplit(".", 1)[-1]) else show(redact_secrets(value))
    return f"{path} = {shown}: {what}. Fix: {fix}."


def uses_lora(model: ModelSection) -> bool:
    return model.language == "lora" or model.vision == "lora"


def _duplicates(path: str, values: tuple[str, ...], consequence: str) -> list[str]:
    repeated = sorted({value for value in values if values.count(value) > 1})
    return [
        issue(path, values, f"{value!r} is listed twice, {consequence}", "list it once") for value in repeated
    ]


def _stage_problems(stages: tuple[str, ...]) -> list[str]:
    if not stages:
        return [issue("stages", stages, "nothing would run", "list some of sft, dpo, grpo, eval, export")]
    problems = _duplicates("stages", stages, "so it would run twice")
    listed = list(dict.fromkeys(stages))
    if listed != sorted(listed, key=STAGE_ORDER.index):
        what = "stages run in the order sft, dpo, grpo, eval, export: each uses the output of the one before"
        problems.append(issue("stages", stages, what, f"write {sorted(listed, key=STAGE_ORDER.index)}"))
    return problems


def _model_problems(recipe: Recipe) -> list[str]:
    model, lora = recipe.model, recipe.lora
    problems = []
    if model.attn_implementation == "flash_attention_2" and model.dtype == "float32":
        what = "flash-attention runs only in 16 bits, but model.dtype is 'float32'"
        fix = "set model.dtype: bfloat16, or model.attn_implementation: sdpa"
        problems.append(issue("model.attn_implementation", model.attn_implementation, what, fix))
    problems += _quantization_problems(model)
    for part, path, names in (
        ("language", "lora.target_modules", lora.target_modules),
        ("vision", "lora.vision_target_modules", lora.vision_target_modules),
    ):
        if getattr(model, part) == "lora" and not names:
            what = f"model.{part} is lora but no module would get an adapter"
            problems.append(
                issue(path, names, what, f"list module names, or delete {path} to get the defaults")
            )
    return problems


def _quantization_problems(model: ModelSection) -> list[str]:
    """QLoRA: quantised weights are frozen storage, so only adapters can train on them; flash-attention needs 16-bit
    activations, which a float32 compute dtype would not give."""
    if model.quantization == "none":
        return []
    problems = []
    if model.language == "full":
        what = (
            f"model.language is full, but bitsandbytes' {model.quantization} weights are frozen storage (no "
            "gradient reaches them, an optimizer cannot update them)"
        )
        fix = "set model.language: lora (QLoRA), or model.quantization: none for full fine-tuning"
        problems.append(issue("model.quantization", model.quantization, what, fix))
    # (model.dtype float32 with flash-attention is refused by its own rule.)
    if (
        model.attn_implementation == "flash_attention_2"
        and model.quantization != "int8"
        and model.quant_compute_dtype == "float32"
    ):
        what = "flash-attention runs only in 16 bits, but the 4-bit layers would compute in float32"
        fix = "set model.quant_compute_dtype: bfloat16, or model.attn_implementation: sdpa"
        problems.append(issue("model.quant_compute_dtype", model.quant_compute_dtype, what, fix))
    return problems


def _data_problems(recipe: Recipe) -> list[str]:
    data, problems = recipe.data, []
    fewest = min_image_tokens(recipe.model)
    if fewest is not None and data.max_length < fewest:
        what = (
            f"the smallest image takes {fewest} tokens at model.num_crops={recipe.model.num_crops}, "
            "so no sample with an image would fit"
        )
        fix = "raise data.max_length above that plus the text, or lower model.num_crops"
        problems.append(issue("data.max_length", data.max_length, what, fix))
    for group, sources in (("train", data.train), ("eval", data.eval)):
        for index, source in enumerate(sources):
            if not source.path and source.format != "synthetic":
                what, fix = (
                    "the source has nothing to read",
                    "give a hub dataset id or a local file or directory",
                )
                problems.append(issue(f"data.{group}.{index}.path", source.path, what, fix))
    return problems + _stage_data_problems(data, recipe.stages)


def _stage_data_problems(data: DataSection, stages: tuple[str, ...]) -> list[str]:
    """Each training stage needs a source in a format it reads; a source no stage reads would be ignored."""
    training = [stage for stage in STAGE_FORMATS if stage in stages]
    formats = [source.format for source in data.train]
    problems = []
    for stage in training:
        if not STAGE_FORMATS[stage] & set(formats):
            what = f"stage {stage} needs a source in one of the formats {', '.join(sorted(STAGE_FORMATS[stage]))}"
            problems.append(
                issue("data.train", formats, what, f"add such a source, or remove {stage} from stages")
            )
    for index, source in enumerate(data.train):
        if training and not any(source.format in STAGE_FORMATS[stage] for stage in training):
            what = f"no stage in stages {list(stages)} reads this format, so the source would be ignored"
            fix = "remove the source, or add the stage that reads it"
            problems.append(issue(f"data.train.{index}.format", source.format, what, fix))
    return problems


def _train_problems(recipe: Recipe) -> list[str]:
    train, problems = recipe.train, []
    if {"sft", "dpo", "grpo"} & set(recipe.stages) and (train.max_steps is None) == (train.epochs is None):
        if train.max_steps is None:
            what, fix = (
                "train.epochs is null too, so training has no length",
                "set one, e.g. train.epochs: 1.0",
            )
        else:
            what = f"train.epochs is set too ({train.epochs}), so it is unclear which one ends training"
            fix = "keep one and set the other to null (on the command line: train.epochs=null)"
        problems.append(issue("train.max_steps", train.max_steps, what, fix))
    if len(train.adam_betas) != 2:
        problems.append(
            issue("train.adam_betas", train.adam_betas, "AdamW takes two betas", "write [0.9, 0.999]")
        )
    if train.resume and recipe.overwrite_output_dir:
        what = "overwrite_output_dir is true too, and overwriting deletes the checkpoints to resume from"
        problems.append(issue("train.resume", True, what, "set overwrite_output_dir: false"))
    if train.precision == "fp32" and recipe.model.dtype != "float32":
        what = f"model.dtype is {recipe.model.dtype}, and fp32 training without autocast cannot mix it with fp32 trained parts"
        problems.append(
            issue("train.precision", "fp32", what, "set model.dtype: float32, or train.precision: bf16")
        )
    for index, key in enumerate(
        train.resume_allow_changes
    ):  # keys a resume may change (train/core/checkpoint.py)
        if key not in RESUME_KEYS:
            problems.append(
                issue(
                    f"train.resume_allow_changes.{index}",
                    key,
                    "no such run-shaping key, so it would allow nothing",
                    f"list some of {', '.join(RESUME_KEYS)}",
                )
            )
    if train.resume and recipe.output_dir is None:
        what = "output_dir is null, so the run gets a fresh directory without checkpoints"
        problems.append(issue("train.resume", True, what, "set output_dir to the run directory to resume"))
    return problems + _sequence_parallel_problems(recipe)


def _sequence_parallel_problems(recipe: Recipe) -> list[str]:
    """The group must split the heads (Ulysses gives each rank H/N of them) and the sequence; the processes are
    known only at launch (train.parallel checks them there)."""
    size, problems = recipe.train.sequence_parallel, []
    if size == 1:
        return problems
    path = "train.sequence_parallel"
    if recipe.model.attn_implementation not in ("sdpa", "flash_attention_2"):
        problems.append(
            issue(
                path,
                size,
                f"Ulysses attention needs sdpa or flash_attention_2, and "
                f"model.attn_implementation is {recipe.model.attn_implementation!r}",
                "set model.attn_implementation: sdpa",
            )
        )
    heads = attention_heads(recipe.model)
    if heads is not None and heads % size:
        problems.append(
            issue(
                path,
                size,
                f"the model has {heads} attention heads, which {size} ranks cannot share equally",
                f"use a divisor of {heads}",
            )
        )
    if size > recipe.data.max_length:
        problems.append(
            issue(
                path,
                size,
                f"a group larger than data.max_length ({recipe.data.max_length}) leaves "
                "ranks without a token",
                "use a smaller group",
            )
        )
    if "grpo" in recipe.stages:
        problems.append(
            issue(
                path,
                size,
                "the grpo stage does not split sequences (its rollouts generate whole prompts on each rank)",
                "run grpo in its own launch with train.sequence_parallel=1",
            )
        )
    return problems


def _dpo_problems(recipe: Recipe) -> list[str]:
    dpo = recipe.dpo
    if "dpo" not in recipe.stages:
        return []
    problems = _duplicates("dpo.losses", tuple(loss.type for loss in dpo.losses), "so it would count twice")
    if not dpo.losses:
        fix = "list one, e.g. [{type: sigmoid, weight: 1.0}]"
        problems.append(issue("dpo.losses", dpo.losses, "the DPO stage would have no loss", fix))
    for index, loss in enumerate(dpo.losses):
        if dpo.label_smoothing != 0 and loss.type not in LABEL_SMOOTHING_LOSSES:
            what = (
                f"the {loss.type!r} loss (dpo.losses.{index}) has no label smoothing, so it would be ignored"
            )
            fix = "set dpo.label_smoothing: 0.0, or use only the sigmoid and robust losses"
            problems.append(issue("dpo.label_smoothing", dpo.label_smoothing, what, fix))
    if dpo.from_sft is not None and "sft" in recipe.stages:
        what = "stages run sft too, so DPO would have two starting points"
        fix = "set dpo.from_sft: null to start from this run's SFT, or remove sft from stages"
        problems.append(issue("dpo.from_sft", dpo.from_sft, what, fix))
    return problems


def _eval_problems(recipe: Recipe) -> list[str]:
    ev = recipe.eval
    if "eval" not in recipe.stages:
        return []
    problems = _duplicates("eval.when", ev.when, "so it would be scored twice")
    if not ev.tasks:
        fix = "list task names, or remove eval from stages"
        problems.append(issue("eval.tasks", ev.tasks, "the eval stage would score nothing", fix))
    for stage in dict.fromkeys(ev.when):
        if stage != "base" and stage not in recipe.stages:
            what = f"stage {stage} does not run, so there is no {stage} model to score"
            problems.append(
                issue("eval.when", ev.when, what, f"add {stage} to stages, or remove it from eval.when")
            )
    return problems


HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _export_problems(recipe: Recipe) -> list[str]:
    export = recipe.export
    for key in ("hub_id", "base_model_id"):
        value = getattr(export, key)
        if value is not None and not HUB_REPO_ID.match(value):
            what = "a hub repository id is ORG/NAME (letters, digits, -, _, .)"
            return [issue(f"export.{key}", value, what, "write it as ORG/NAME, or null")]
    if "export" not in recipe.stages:
        return []
    if not (export.adapter or export.merged):
        what = "export.merged is false too, so the export stage would write nothing"
        return [issue("export.adapter", False, what, "set export.adapter or export.merged to true")]
    if export.adapter and not uses_lora(recipe.model):
        what = "no part of the model trains with LoRA, so there is no adapter to save"
        return [issue("export.adapter", True, what, "set export.adapter: false and export.merged: true")]
    return []


def _pattern_problem(path: str, pattern: str | None) -> list[str]:
    if pattern is None:
        return []
    try:
        re.compile(pattern)
    except re.error as error:
        return [
            issue(path, pattern, f"not a regular expression ({error})", "fix the pattern (Python re syntax)")
        ]
    return []


def _grpo_problems(recipe: Recipe) -> list[str]:
    grpo = recipe.grpo
    if "grpo" not in recipe.stages:
        return []
    problems = _duplicates(
        "grpo.rewards", tuple(r.function or r.type for r in grpo.rewards), "so it would count twice"
    )
    if not grpo.rewards:
        problems.append(
            issue("grpo.rewards", grpo.rewards, "GRPO would have no reward", "list e.g. {type: exact_match}")
        )
    for index, reward in enumerate(grpo.rewards):
        if reward.type == "format" and not reward.pattern:
            problems.append(
                issue(
                    f"grpo.rewards.{index}.pattern",
                    None,
                    "a format reward needs a pattern",
                    "set pattern, e.g. '^<think>.*</think>\\s*<answer>.*</answer>$'",
                )
            )
        if reward.type == "function" and (not reward.function or ":" not in reward.function):
            problems.append(
                issue(
                    f"grpo.rewards.{index}.function",
                    reward.function,
                    "a function reward needs the import path of your function",
                    "set function: my_module:my_reward",
                )
            )
        problems += _pattern_problem(f"grpo.rewards.{index}.pattern", reward.pattern)
    problems += _pattern_problem("grpo.answer_pattern", grpo.answer_pattern)
    if grpo.top_p > 1:
        problems.append(issue("grpo.top_p", grpo.top_p, "a probability mass above 1", "set it in (0, 1]"))
    if grpo.beta > 0 and recipe.model.language == "full":
        what = "the KL reference is the adapter-disabled model, and model.language: full trains no adapter"
        problems.append(issue("grpo.beta", grpo.beta, what, "set grpo.beta: 0.0, or model.language: lora"))
    if grpo.num_iterations > 1 and recipe.train.checkpoint_every % grpo.num_iterations:
        what = (
            f"a checkpoint inside a generation's {grpo.num_iterations} passes would resume by sampling it again, "
            "not exactly"
        )
        problems.append(
            issue(
                "train.checkpoint_every",
                recipe.train.checkpoint_every,
                what,
                f"use a multiple of grpo.num_iterations ({grpo.num_iterations})",
            )
        )
    return problems


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every cross-field problem of a well-typed, in-range recipe; empty when it is valid."""
    return [
        *_stage_problems(recipe.stages),
        *_model_problems(recipe),
        *_data_problems(recipe),
        *_train_problems(recipe),
        *_dpo_problems(recipe),
        *_grpo_problems(recipe),
        *_eval_problems(recipe),
        *_export_problems(recipe),
        *_duplicates("logging.report_to", recipe.logging.report_to, "so it would log twice"),
    ]


def recipe_warnings(recipe: Recipe, origins: dict[str, str]) -> list[str]:
    """Settings that have no effect on the run; `origins` (config.parse.provenance) says which were set explicitly."""
    model, train, data = recipe.model, recipe.train, recipe.data
    found = []
    if not uses_lora(model) and any(
        path.startswith("lora.") and o != "default" for path, o in origins.items()
    ):
        found.append("the lora section is ignored: model.language is full and model.vision is not lora")
    if train.lr_vision is not None and model.vision == "frozen":
        found.append(f"train.lr_vision = {train.lr_vision} is ignored: model.vision is frozen")
    if train.lr_projector is not None and model.projector == "frozen":
        found.append(f"train.lr_projector = {train.lr_projector} is ignored: model.projector is frozen")
    if model.quantization in ("none", "int8"):
        # By value, not by origin: the resolved recipe of a run spells every key, defaults included.
        defaults = ModelSection()
        for key in ("double_quant", "quant_compute_dtype"):
            if getattr(model, key) != getattr(defaults, key):
                found.append(
                    f"model.{key} = {show(getattr(model, key))} is ignored: it applies to 4-bit weights, "
                    f"and model.quantization is {model.quantization}"
                )
    if recipe.export.merge_base == "quantized" and model.quantization == "none":
        found.append(
            "export.merge_base = quantized is ignored: model.quantization is none, the base is not quantised"
        )
    if data.packing and data.group_by_length:
        found.append(
            "data.group_by_length is ignored: data.packing fills every sequence up to data.max_length"
        )
    return found
