"""Export merged weights in the original hub layout, from a run directory's adapters.

    python -m train.export RUN_DIR [--stage sft|dpo] [--dtype bfloat16|float16|float32] [--overwrite]

SFT merges its adapter into the base; DPO merges the SFT adapter it started from (recorded in dpo/start.json), then
its own. The result, `<run>/<stage>/merged/`, loads with `Phi3VForCausalLM.from_pretrained` (and, its config.json
being the hub's shape, with the official code and vLLM). A stage trained in full already saved `merged/`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from peft import PeftModel

import models
from models import DTYPES

from .common import base_path, save_atomically
from .recipe import load_recipe

log = logging.getLogger("train.export")


def base_source(run_dir: Path) -> tuple[str, str | None]:
    """(path or hub id, revision) of the model SFT started from."""
    model_section = load_recipe(run_dir / "recipe.resolved.yaml").model
    revision = None if model_section.name_or_path == "tiny" else model_section.revision
    return base_path(model_section, run_dir), revision


def adapters_upto(run_dir: Path, stage: str) -> tuple[str, str | None, list[Path]]:
    """(base, revision, adapters to merge in order) for `stage`'s merged model."""
    if stage == "sft":
        base, revision = base_source(run_dir)
        return base, revision, [run_dir / "sft" / "adapter"]
    start = json.loads((run_dir / "dpo" / "start.json").read_text())
    chain = [Path(start["sft_adapter"])] if start.get("sft_adapter") else []
    return start["base"], start.get("revision"), [*chain, run_dir / "dpo" / "adapter"]


def merge(base: str, revision: str | None, adapters: list[Path], dtype: str):
    """Merge in float32 (no rounding between the merges), then cast once to `dtype`."""
    model, processor = models.load(base, revision=revision, dtype="float32")
    for adapter in adapters:
        if not (adapter / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter} holds no PEFT adapter (adapter_config.json); was the stage trained?")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        log.info("merged %s", adapter)
    return model.to(DTYPES[dtype]), processor


def export_stage(run_dir: Path, stage: str, dtype: str, overwrite: bool = False) -> Path:
    target = run_dir / stage / "merged"
    if target.exists() and not overwrite:
        if not (run_dir / stage / "adapter").exists():
            return target  # trained in full: the stage saved its merged weights itself
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    base, revision, adapters = adapters_upto(run_dir, stage)
    model, processor = merge(base, revision, adapters, dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    return save_atomically(target, write)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", choices=["sft", "dpo"], action="append",
                        help="stage(s) to export; default: every trained stage of the run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the recipe's export.merged_dtype")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.run_dir / "recipe.resolved.yaml")
    if not args.stage and not recipe.export.merged:
        print(f"export.merged is false: nothing to merge; the adapters are in {args.run_dir}/<stage>/adapter")
        return []
    stages = args.stage or [s for s in ("sft", "dpo") if (args.run_dir / s).is_dir()]
    written = []
    with torch.no_grad():
        for stage in stages:
            written.append(export_stage(args.run_dir, stage, args.dtype or recipe.export.merged_dtype, args.overwrite))
            print(f"{stage}: {written[-1]}")
    return written


if __name__ == "__main__":
    main()
