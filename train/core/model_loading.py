"""The model a stage trains: loaded from the recipe (hub id, local folder, or the demo's tiny model built once into
the run directory) or from a run's weights (a base plus adapters to merge), and saved when the stage ends.

With `model.quantization` (QLoRA) the language model's linears are quantised after loading, and after merging
earlier adapters: a merge needs the real weights, so DPO's starting point is the SFT adapter merged into the
16/32-bit base, then quantised (models/quantization.py; docs/qlora.md says why)."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from peft import PeftModel

import models
from config import ModelSection, Recipe
from data.synthetic import synthetic_texts
from models.adapters import apply_adapter, make_portable
from models.phi3v.export_files import remote_code_repo, write_old_stack_tokenizer, write_processor_files
from models.phi3v.tiny import build_demo_model
from models.quantization import apply_quantization
from rundir.atomic import replace_dir_atomically
from rundir.layout import base_path, is_adapter, is_checkpoint
from rundir.weights import Weights, base_hub_id, recipe_base, write_weights_manifest
from train.core.device import apply_liger, whole_model_loading


def build_tiny(model_section: ModelSection, seed: int):
    """The demo's tiny model and processor: a tokenizer trained on the synthetic data's texts, weights from `seed`."""
    return build_demo_model(synthetic_texts(), num_crops=model_section.num_crops, seed=seed)


def load_model(model_section: ModelSection, run_dir: Path, *, seed: int, accelerator: Accelerator):
    """(model, processor, base_path). `tiny` builds the demo model once into run_dir/base and loads it from there,
    so every later stage (DPO, eval, export) loads its base like any other checkpoint folder."""
    apply_liger(model_section.liger)  # class-level patches: before the model is built
    source = base_path(model_section, run_dir)
    if model_section.name_or_path == "tiny":
        with accelerator.main_process_first():
            if accelerator.is_main_process and not is_checkpoint(Path(source)):
                tiny_model, tiny_processor = build_tiny(model_section, seed)
                replace_dir_atomically(
                    Path(source),
                    lambda tmp: (tiny_model.save_pretrained(tmp), tiny_processor.save_pretrained(tmp)),
                )
    with whole_model_loading(accelerator):
        model, processor = models.load(
            source,
            revision=model_section.revision,
            dtype=model_section.dtype,
            attn_implementation=model_section.attn_implementation,
            num_crops=model_section.num_crops,
        )
    return apply_quantization(model, model_section), processor, source


def load_weights(weights: Weights, model_section: ModelSection, *, dtype: str | None = None):
    """(model, processor): `weights.base` with each of its adapters merged in, in order (full-trained parts first,
    `models.adapters.apply_adapter`), then quantised as `model_section.quantization` says (pass a section with
    `quantization: none` for the unquantised merge)."""
    model, processor = models.load(
        weights.base,
        revision=weights.revision,
        dtype=dtype or model_section.dtype,
        attn_implementation=model_section.attn_implementation,
        num_crops=model_section.num_crops,
    )
    for adapter in weights.adapters:
        model = apply_adapter(model, adapter, merge=True)
    return apply_quantization(model, model_section), processor


def is_peft(model) -> bool:
    return isinstance(model, PeftModel)


def save_trained(
    accelerator: Accelerator,
    model,
    processor,
    folder: Path,
    *,
    recipe: Recipe | None = None,
    run_dir: Path | None = None,
    applies_after: tuple[Path, ...] = (),
) -> Path:
    """The adapter in PEFT layout (LoRA), or the whole model in the hub layout (full fine-tuning), with the
    processor beside it, written atomically. An adapter is made portable (`models.adapters.make_portable`: old
    PEFT keys, explicit targets, the base's hub id, full-trained parts in `full_weights.safetensors`) when the
    recipe is given; `applies_after` names adapters it is trained on top of (DPO over SFT), recorded beside it.
    Its weight files are recorded in `manifest.json` (rundir/layout.py `verify_weights` checks them on loading)."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; a plain state dict otherwise
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:

        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            processor.save_pretrained(tmp)
            if recipe is not None and is_adapter(tmp):
                make_portable(
                    tmp,
                    base_id=base_hub_id(recipe, run_dir),
                    local_base=str(Path(base_path(recipe.model, run_dir)).resolve())
                    if Path(base_path(recipe.model, run_dir)).is_dir()
                    else None,
                    revision=recipe.model.revision,
                    applies_after=[str(a) for a in applies_after],
                )
                write_old_stack_tokenizer(tmp)  # the adapter's tokenizer, readable by the old stack too
                base_config = unwrapped.get_base_model().config.to_dict()
                write_processor_files(
                    tmp, remote_repo=remote_code_repo(base_hub_id(recipe, run_dir), base_config)
                )
            write_weights_manifest(tmp)  # last: eval, export and DPO verify the weights before loading them

        replace_dir_atomically(folder, write)
    accelerator.wait_for_everyone()
    return folder


def load_policy(start: Weights, recipe: Recipe, run_dir: Path, accelerator):
    """The policy a stage after SFT starts from (DPO, GRPO): the starting weights with their adapters merged in (the
    recipe's base itself, built first for `tiny`, when the stage starts from the base)."""
    if start == recipe_base(recipe, run_dir):
        model, processor, _ = load_model(recipe.model, run_dir, seed=recipe.seed, accelerator=accelerator)
        return model, processor
    with whole_model_loading(accelerator):
        return load_weights(start, recipe.model)
