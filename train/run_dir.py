"""The run directory: created once, never clobbered, self-describing (resolved recipe, versions, commit, seed)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .recipe import save_resolved
from .recipe_schema import Recipe

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "deepspeed", "tokenizers", "safetensors",
            "pillow", "numpy", "flash-attn", "liger-kernel", "wandb", "tensorboard")


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, stage: str, is_main: bool) -> Path:
    """Create `run_dir/<stage>` for this stage. A stage directory that already holds files is an error unless the
    recipe says `overwrite_output_dir: true` or `train.resume: true` (resume continues it)."""
    stage_dir = Path(run_dir) / stage
    if is_main:
        occupied = stage_dir.exists() and any(stage_dir.iterdir())
        if occupied and not (recipe.overwrite_output_dir or recipe.train.resume):
            raise FileExistsError(
                f"{stage_dir} already holds a {stage} run; refusing to overwrite it. Choose another output_dir, "
                f"resume it with train.resume=true, or pass overwrite_output_dir=true to replace its files"
            )
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(recipe, run_dir)
        (Path(run_dir) / "env.json").write_text(json.dumps(environment(recipe.seed), indent=2) + "\n")
    return stage_dir


def environment(seed: int) -> dict:
    """Package versions, git commit, interpreter, machine and seed: enough to reproduce or explain a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "seed": seed,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
