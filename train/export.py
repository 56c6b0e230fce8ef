"""Export merged weights in the original hub layout, from a run directory's adapters.

    python -m train.export RUN_DIR [--stage sft|dpo] [--dtype bfloat16|float16|float32] [--overwrite]

A stage's weights are what `recipe.run_dir.stage_weights` says (the same answer DPO and the eval CLI get): SFT's
adapter over the base; DPO's over the starting point it recorded. They are merged in float32 (no
rounding between merges) and cast once to the dtype. The result, `<run>/<stage>/merged/`, loads with
`Phi3VForCausalLM.from_pretrained` (and, its config.json being the hub's shape, with the official code and vLLM).
A stage trained in full already saved `merged/`.

QLoRA runs (`model.quantization`): by default (`export.merge_base: original`) the adapters are merged into the
original base checkpoint loaded unquantised in float32, which is what one serves. The adapter was trained against
the 4-bit rounded weights, so this model differs from the one trained and evaluated by the rounding error the adapter
had learnt to live with (docs/qlora.md measures it). `export.merge_base: quantized` merges into those rounded weights
instead (quantised as in training, dequantised to float32): for nf4/fp4 the trained model exactly, in 16/32 bits
(int8 layers also quantise their inputs, which no dequantised checkpoint reproduces).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from models import DTYPES
from models.quantization import apply_quantization, dequantize_language_model_
from recipe.run_dir import (
    TRAINED_STAGES,
    adapter_dir,
    is_adapter,
    load_run_recipe,
    merged_dir,
    replace_dir_atomically,
    stage_dir,
    stage_weights,
)
from train.model_loading import load_weights

log = logging.getLogger("train.export")


def export_stage(run_dir: Path, stage: str, dtype: str, overwrite: bool = False) -> Path:
    target = merged_dir(run_dir, stage)
    if target.exists() and not overwrite:
        if not adapter_dir(run_dir, stage).exists():
            return target  # trained in full: the stage saved its merged weights itself
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if not is_adapter(adapter_dir(run_dir, stage)):
        raise FileNotFoundError(f"{adapter_dir(run_dir, stage)} holds no PEFT adapter (adapter_config.json); was the "
                                f"{stage} stage trained?")
    recipe = load_run_recipe(run_dir)
    weights = stage_weights(run_dir, stage, recipe)
    # sdpa: merging needs no attention kernel, and flash-attn may not load on the exporting machine.
    section = replace(recipe.model, attn_implementation="sdpa")
    if recipe.model.quantization != "none" and recipe.export.merge_base == "quantized":
        model, processor = merge_into_quantized(weights, section)
    else:
        model, processor = load_weights(weights, replace(section, quantization="none"), dtype="float32")
    log.info("merged %s", weights.describe())
    model = model.to(DTYPES[dtype])

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return replace_dir_atomically(target, write)


def merge_into_quantized(weights, model_section):
    """(model, processor): the stage's model as trained (the base in model.dtype with all adapters but the last merged
    in, then quantised: what training loaded), its 4-bit weights dequantised to float32, the last adapter merged into
    those."""
    from peft import PeftModel

    earlier = replace(weights, adapters=weights.adapters[:-1])
    model, processor = load_weights(earlier, replace(model_section, quantization="none"))
    dequantize_language_model_(apply_quantization(model, model_section), torch.float32)
    model = model.float()  # the other parts, as the original merge has them
    return PeftModel.from_pretrained(model, str(weights.adapters[-1])).merge_and_unload(), processor


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", choices=list(TRAINED_STAGES), action="append",
                        help="stage(s) to export; default: every trained stage of the run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the recipe's export.merged_dtype")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_run_recipe(args.run_dir)
    if not args.stage and not recipe.export.merged:
        print(f"export.merged is false: nothing to merge; the adapters are in {args.run_dir}/<stage>/adapter")
        return []
    stages = args.stage or [s for s in TRAINED_STAGES if stage_dir(args.run_dir, s).is_dir()]
    written = []
    with torch.no_grad():
        for stage in stages:
            written.append(export_stage(args.run_dir, stage, args.dtype or recipe.export.merged_dtype, args.overwrite))
            print(f"{stage}: {written[-1]}")
    return written


if __name__ == "__main__":
    main()
