"""Which weights a stage holds: the one answer (`stage_weights`) that DPO, GRPO, the eval CLI and export ask; the
starting point a preference stage records (`start.json`, with the sha256 of each weight file); and the manifests
verified before a weights folder is trusted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from config.schema import Recipe
from models.adapters import (  # an adapter folder's own files
    ADAPTER_CONFIG,
)
from models.phi3v.export_files import remote_code_repo
from rundir.atomic import write_json_atomically
from rundir.layout import (
    BASE,
    CHECKPOINT_CONFIG,
    MANIFEST,
    TRAINED_STAGES,
    adapter_dir,
    base_path,
    is_adapter,
    is_checkpoint,
    is_run_dir,
    load_run_recipe,
    merged_dir,
    recipe_file,
    start_file,
)
from rundir.manifest import ManifestError, file_sha256, read_manifest, verify_manifest, write_manifest

WEIGHT_FILES = (
    ".safetensors",
)  # what a weights folder's manifest covers (cards and configs are rewritten later)


# ----------------------------------------------------------------------------------------------- which weights


@dataclass(frozen=True, kw_only=True)
class Weights:
    """A model as loadable parts: `base` (hub id or folder, at `revision`), then each adapter merged in order."""

    base: str
    revision: str | None = None
    adapters: tuple[Path, ...] = ()

    def describe(self) -> str:
        return self.base + "".join(f" + {adapter}" for adapter in self.adapters)


def manifest_file(folder: Path) -> Path:
    return Path(folder) / MANIFEST


def write_folder_manifest(folder: Path, suffixes: tuple[str, ...] = ("",)) -> Path:
    """`folder/manifest.json`: each file's path, size and sha256 (rundir/manifest.py), written after them."""
    return write_manifest(folder, manifest_file(folder), suffixes)


def write_weights_manifest(folder: Path) -> Path:
    """The manifest of an adapter or merged folder: its weight files (model cards and configs change after)."""
    return write_folder_manifest(folder, WEIGHT_FILES)


def verify_folder(folder: Path, closed: tuple[str, ...] = ()) -> dict[str, dict]:
    """Raise ManifestError naming the first file of `folder` that is not as its manifest records."""
    return verify_manifest(folder, manifest_file(folder), closed)


def verify_weights(weights: Weights) -> Weights:
    """`weights`, once every local folder of it that holds a manifest (this project's adapters and merged models)
    passed it: a weight file cut short or changed is refused before it is loaded."""
    for folder in (Path(weights.base), *weights.adapters):
        if manifest_file(folder).is_file():
            try:
                verify_folder(folder)
            except ManifestError as error:
                raise ManifestError(
                    f"refusing to load {folder}: {error}. Fix: restore the folder from a copy, or "
                    "train the stage again"
                ) from None
    return weights


def base_weights(run_dir: Path, recipe: Recipe | None = None) -> Weights:
    """The weights the run's first stage started from."""
    recipe = recipe or load_run_recipe(run_dir)
    if recipe.model.name_or_path == "tiny" and not is_checkpoint(Path(run_dir) / BASE):
        raise FileNotFoundError(
            f"{run_dir} has no {BASE}/ checkpoint, and the recipe's model is 'tiny' (built with random weights when a "
            "run starts): the weights the run trained on are not available. Fix: pass the run directory that holds "
            f"{BASE}/"
        )
    return recipe_base(recipe, run_dir)


def recipe_base(recipe: Recipe, run_dir: Path) -> Weights:
    """The recipe's base model as this run loads it (the demo's `tiny` from run_dir/base, built by the first stage)."""
    revision = None if recipe.model.name_or_path == "tiny" else recipe.model.revision
    return Weights(base=base_path(recipe.model, run_dir), revision=revision)


def stage_weights(run_dir: Path, stage: str, recipe: Recipe | None = None) -> Weights:
    """The weights of `stage` ('base', 'sft' or 'dpo') of a run: its adapter over what it started from, else its
    merged checkpoint. DPO started from what `dpo/start.json` records. Each folder's manifest, where it has one, is
    verified first (`verify_weights`)."""
    run_dir = Path(run_dir)
    if stage == "base":
        return base_weights(run_dir, recipe)
    adapter, merged = adapter_dir(run_dir, stage), merged_dir(run_dir, stage)
    if is_adapter(adapter):
        start = base_weights(run_dir, recipe) if stage == "sft" else read_start(run_dir, stage)
        return verify_weights(
            Weights(base=start.base, revision=start.revision, adapters=(*start.adapters, adapter))
        )
    if is_checkpoint(merged):
        return verify_weights(Weights(base=str(merged)))
    raise FileNotFoundError(
        f"{run_dir} has no {stage} model: neither {adapter} nor {merged} holds weights. Fix: run "
        f"the {stage} stage, or pick another stage"
    )


def latest_stage(run_dir: Path) -> str:
    """The last trained stage of a run ('dpo', 'sft'), or 'base'."""
    for stage in reversed(TRAINED_STAGES):
        if is_adapter(adapter_dir(run_dir, stage)) or is_checkpoint(merged_dir(run_dir, stage)):
            return stage
    return "base"


def dpo_start(recipe: Recipe, run_dir: Path) -> Weights:
    """What DPO starts from: `dpo.from_sft` (an SFT run directory, an adapter folder or a checkpoint), else this run's
    SFT model when its stages include sft, else the base."""
    if recipe.dpo.from_sft is None:
        return (
            stage_weights(run_dir, "sft", recipe) if "sft" in recipe.stages else recipe_base(recipe, run_dir)
        )
    source = Path(recipe.dpo.from_sft)
    if is_run_dir(source):
        return stage_weights(source, "sft")
    if is_adapter(source):  # <sft run>/sft/adapter, or a lone adapter over this recipe's base
        sft_run = source.parent.parent
        base = base_weights(sft_run) if recipe_file(sft_run).is_file() else recipe_base(recipe, run_dir)
        return verify_weights(Weights(base=base.base, revision=base.revision, adapters=(source,)))
    if is_checkpoint(source):
        return verify_weights(Weights(base=str(source)))
    raise FileNotFoundError(
        f"dpo.from_sft = {str(source)!r} holds no SFT model (no {ADAPTER_CONFIG} or "
        f"{CHECKPOINT_CONFIG}, and no run directory): point it at the SFT run directory or its "
        "adapter"
    )


def weights_sha256(folder: Path) -> dict[str, str]:
    """{file name: sha256} of every weight file of an adapter or merged folder: an adapter's
    `adapter_model.safetensors` (LoRA) and `full_weights.safetensors` (the parts trained in full, e.g. the projector).
    Read from the folder's manifest when it has one (`verify_weights` checked it against the files), else hashed."""
    folder = Path(folder)
    if manifest_file(folder).is_file():
        files = read_manifest(manifest_file(folder))
        return {rel: entry["sha256"] for rel, entry in sorted(files.items()) if rel.endswith(WEIGHT_FILES)}
    return {path.name: file_sha256(path) for path in sorted(folder.glob("*.safetensors"))}


def start_weights_sha256(start: Weights) -> list[dict[str, str]]:
    """The content hash of every weight file DPO starts from: each adapter's, and the base's when it is a folder
    with a manifest (a merged SFT model): a changed projector shows as surely as a changed LoRA."""
    hashes = [weights_sha256(adapter) for adapter in start.adapters]
    if manifest_file(start.base).is_file():
        hashes.insert(0, weights_sha256(Path(start.base)))
    return hashes


def write_start(run_dir: Path, start: Weights, stage: str = "dpo") -> Path:
    """<stage>/start.json (DPO, GRPO): the starting weights, with the hash of each of their weight files (to detect
    a changed starting model, its projector included)."""
    record = {
        "base": start.base,
        "revision": start.revision,
        "adapters": [str(a) for a in start.adapters],
        "weights_sha256": start_weights_sha256(start),
    }
    return write_json_atomically(start_file(run_dir, stage), record)


def grpo_start(recipe: Recipe, run_dir: Path) -> Weights:
    """What GRPO starts from: this run's DPO model when its stages include dpo, else its SFT model when they include
    sft, else the base."""
    for stage in ("dpo", "sft"):
        if stage in recipe.stages:
            return stage_weights(run_dir, stage, recipe)
    return recipe_base(recipe, run_dir)


def read_start(run_dir: Path, stage: str = "dpo") -> Weights:
    path = start_file(run_dir, stage)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the {stage} stage records its starting point there when it starts"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    return Weights(
        base=record["base"],
        revision=record.get("revision"),
        adapters=tuple(Path(a) for a in record.get("adapters", ())),
    )


def base_hub_id(recipe: Recipe, run_dir: Path | None) -> str:
    """The hub id of the run's base: `export.base_model_id`, else `model.name_or_path` when it is a hub id, else
    (a local copy) the Microsoft repository its config matches; the demo's `tiny` (on no hub) gives its folder."""
    if recipe.export.base_model_id:
        return recipe.export.base_model_id
    name = recipe.model.name_or_path
    if name == "tiny":
        return str((Path(run_dir) / BASE).resolve()) if run_dir is not None else name
    if not Path(name).is_dir():
        return name
    config_file = Path(name) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return remote_code_repo(name, config)
