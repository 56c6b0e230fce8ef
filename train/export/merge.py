"""Export merged weights in the original hub layout, from a run directory's adapters; model cards; upload.

    python -m train.export RUN_DIR [--stage sft|dpo] [--dtype bfloat16|float16|float32] [--overwrite]
                           [--push-to-hub ORG/NAME [--private|--public] [--dry-run]]

A stage's weights are what `rundir.weights.stage_weights` says (the same answer DPO and the eval CLI get): SFT's
adapter over the base; DPO's over the starting point it recorded. They are merged in float32 (no
rounding between merges) and cast once to the dtype. The result, `<run>/<stage>/merged/`, loads with
`Phi3VForCausalLM.from_pretrained` / `AutoModelForCausalLM` (after `import models`) and, its files being the hub
checkpoint's (`models.phi3v.export_files`), with the official remote code and vLLM (`--trust-remote-code`).
A stage trained in full already saved `merged/`; its files are brought to the hub's shape here. Each exported
folder gets a model card (`train/export/hub.py`); `--push-to-hub` (or `export.hub_id`) uploads the last stage.

QLoRA runs (`model.quantization`): by default (`export.merge_base: original`) the adapters are merged into the
original base checkpoint loaded unquantised in float32, which is what one serves. The adapter was trained against
the 4-bit rounded weights, so this model differs from the one trained and evaluated by the rounding error the adapter
had learnt to live with (docs/qlora.md measures it). `export.merge_base: quantized` merges into those rounded weights
instead (quantised as in training, dequantised to float32): for nf4/fp4 the trained model exactly, in 16/32 bits
(int8 layers also quantise their inputs, which no dequantised checkpoint reproduces).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from models import DTYPES
from models.adapters import apply_adapter
from models.phi3v.export_files import hub_layout_problems, remote_code_repo, write_hub_files
from models.phi3v.processing import resolve_folder
from models.quantization import apply_quantization, dequantize_language_model_
from rundir import run_lock
from rundir.atomic import replace_dir_atomically
from rundir.layout import (
    TRAINED_STAGES,
    adapter_dir,
    is_adapter,
    is_checkpoint,
    load_run_recipe,
    merged_dir,
    stage_dir,
)
from rundir.weights import base_hub_id, latest_stage, stage_weights, write_weights_manifest
from train.core.device import set_threads
from train.core.model_loading import load_weights
from train.export.hub import push_to_hub, write_cards

MAX_SHARD_SIZE = "4GB"  # the hub checkpoints: 2 shards of about 4-5 GB for 8.3 GB

log = logging.getLogger("train.export.merge")


def export_stage(run_dir: Path, stage: str, dtype: str, overwrite: bool = False) -> Path:
    target = merged_dir(run_dir, stage)
    recipe = load_run_recipe(run_dir)
    if target.exists() and not overwrite:
        if not adapter_dir(
            run_dir, stage
        ).exists():  # trained in full: the stage saved its merged weights itself
            if hub_layout_problems(target):
                finish_hub_folder(target, recipe, run_dir, base_folder=None)
            return target
        if is_checkpoint(target) and not hub_layout_problems(target):
            log.info("%s is already exported; pass --overwrite to merge again", target)
            return target
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if not is_adapter(adapter_dir(run_dir, stage)):
        raise FileNotFoundError(
            f"{adapter_dir(run_dir, stage)} holds no PEFT adapter (adapter_config.json); was the "
            f"{stage} stage trained?"
        )
    weights = stage_weights(run_dir, stage, recipe)
    # sdpa: merging needs no attention kernel, and flash-attn may not load on the exporting machine.
    section = replace(recipe.model, attn_implementation="sdpa")
    if recipe.model.quantization != "none" and recipe.export.merge_base == "quantized":
        model, processor = merge_into_quantized(weights, section)
    else:
        model, processor = load_weights(weights, replace(section, quantization="none"), dtype="float32")
    log.info("merged %s", weights.describe())
    model = model.to(DTYPES[dtype])
    base_folder = resolve_folder(weights.base, weights.revision)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        processor.save_pretrained(tmp)
        finish_hub_folder(tmp, recipe, run_dir, base_folder=base_folder)
        write_weights_manifest(tmp)

    return replace_dir_atomically(target, write)


def finish_hub_folder(folder: Path, recipe, run_dir: Path, *, base_folder: Path | None) -> None:
    """The hub checkpoint's files around the weights (models.phi3v.export_files), then a check of the result."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    write_hub_files(
        folder, remote_repo=remote_code_repo(base_hub_id(recipe, run_dir), config), base_folder=base_folder
    )
    problems = hub_layout_problems(folder)
    if problems:
        raise RuntimeError(f"{folder} departs from the hub layout:\n  " + "\n  ".join(problems))


def merge_into_quantized(weights, model_section):
    """(model, processor): the stage's model as trained (the base in model.dtype with all adapters but the last merged
    in, then quantised: what training loaded), its 4-bit weights dequantised to float32, the last adapter merged into
    those."""
    earlier = replace(weights, adapters=weights.adapters[:-1])
    model, processor = load_weights(earlier, replace(model_section, quantization="none"))
    dequantize_language_model_(apply_quantization(model, model_section), torch.float32)
    model = model.float()  # the other parts, as the original merge has them
    return apply_adapter(model, weights.adapters[-1], merge=True), processor


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--stage",
        choices=list(TRAINED_STAGES),
        action="append",
        help="stage(s) to export; default: every trained stage of the run",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: the recipe's export.merged_dtype"
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        default=None,
        help="upload the last exported stage (merged folder at the root, adapter under adapter/) "
        "with its model cards; default: the recipe's export.hub_id. Token: $HF_TOKEN",
    )
    privacy = parser.add_mutually_exclusive_group()
    privacy.add_argument(
        "--private",
        dest="private",
        action="store_true",
        default=None,
        help="create the repository private (default: the recipe's export.private)",
    )
    privacy.add_argument("--public", dest="private", action="store_false")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --push-to-hub: list the files and the commit message, upload nothing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_run_recipe(args.run_dir)
    set_threads(recipe)
    run_lock.acquire(args.run_dir, command=" ".join(["python -m train.export", *(argv or sys.argv[1:])]))
    try:
        return export_stages(args, recipe)
    finally:
        run_lock.release(args.run_dir)


def export_stages(args, recipe) -> list[Path]:
    """Merge (or finish) each asked stage, write the model cards, upload when asked; the exported folders."""
    stages = args.stage or [s for s in TRAINED_STAGES if stage_dir(args.run_dir, s).is_dir()]
    written = []
    with torch.no_grad():
        for stage in stages:
            if args.stage or recipe.export.merged or not is_adapter(adapter_dir(args.run_dir, stage)):
                written.append(
                    export_stage(
                        args.run_dir, stage, args.dtype or recipe.export.merged_dtype, args.overwrite
                    )
                )
                print(f"{stage}: {written[-1]}")
            else:
                print(
                    f"{stage}: export.merged is false: the adapter is in {adapter_dir(args.run_dir, stage)}"
                )
    repo_id = args.push_to_hub or recipe.export.hub_id
    for stage in stages:
        write_cards(
            recipe,
            args.run_dir,
            stage,
            repo_id=repo_id if stage == push_stage(args.run_dir, stages) else None,
        )
    if repo_id:
        stage = push_stage(args.run_dir, stages)
        private = recipe.export.private if args.private is None else args.private
        report = push_to_hub(args.run_dir, stage, repo_id, private=private, dry_run=args.dry_run)
        verb = "would upload" if args.dry_run else "uploaded"
        print(
            f"{stage}: {verb} {len(report['files'])} files to {repo_id} ({'private' if private else 'public'}), "
            f"commit message {report['commit_message']!r}:"
        )
        for name in report["files"]:
            print(f"  {name}")
    return written


def push_stage(run_dir: Path, stages: list[str]) -> str:
    """The stage an upload takes: the last of `stages` that holds weights."""
    held = [s for s in stages if is_adapter(adapter_dir(run_dir, s)) or is_checkpoint(merged_dir(run_dir, s))]
    return held[-1] if held else latest_stage(run_dir)
