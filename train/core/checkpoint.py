"""Resumable checkpoints: lean, safetensors and JSON only, written atomically and durably, rotated; and the record of
what shaped the run, compared on resume.

A checkpoint `<run>/<stage>/checkpoints/step-NNNNNNNN/` holds (format 1):

    trainable.safetensors      the trainable parameters only (LoRA, trained parts); frozen weights come from the base
    optimizer.safetensors      the optimizer's tensors (AdamW's exp_avg, exp_avg_sq, step), keyed `<index>.<name>`
    optimizer.json             its param groups (hyper-parameters) and each parameter's name, by index
    scheduler.json             the learning-rate scheduler's state_dict()
    rng-<rank>.json/.safetensors  python `random`, numpy, torch CPU (and CUDA) generator states, one pair per rank
    run.json                   the values that shaped the run (RESUME_KEYS), fingerprints of the data and of the
                               frozen weights, and the changes earlier resumes were allowed to make
    loop_state.json            step, epoch, position in the epoch, counters, logged history
    manifest.json              each file's relative path, size and sha256 (rundir/manifest.py); written last

Loading reads exactly these files with `safetensors` and `json`: nothing in a checkpoint folder is ever unpickled, so a
checkpoint someone shares cannot run code (other files in the folder are ignored, with a warning). One exception,
under DeepSpeed (`DistributedType.DEEPSPEED`): the engine owns the optimizer (and the weights' partitions), so the
engine's own checkpoint, written by `accelerator.save_state` into `deepspeed/` (trainable parameters only), uses
DeepSpeed's torch.save format and is loaded with pickle: resume DeepSpeed runs only from checkpoints you wrote. FSDP2
takes the same path (the same `deepspeed/` folder) with accelerate's FSDP format: the whole model's and the optimizer's
shards in torch.distributed.checkpoint files, and pickled random states (docs/distributed.md#fsdp2). Their files are
unpickled only once the manifest vouches for each of them and lists every file in `deepspeed/` (below).

Writes: each rank writes its files into `.tmp-step-N/`, the main process writes the loop state and then the manifest,
fsyncs every file and the folder, then renames it into place; a complete checkpoint of the same step is moved aside (`.old-step-N/`) before the rename and
deleted only after it (restore puts it back if a crash left it there), and older checkpoints are rotated out last.

Verified before trusted: resume takes the newest checkpoint whose files all match its manifest. One that does not
(a tensor file cut short, a file missing or changed) is named in the log with the file and why, renamed
`.failed-step-N/` (kept for inspection, never resumed) and the one before it is tried; when none passes, resume is
refused (ResumeRefused, exit 2) with each failure. The main process verifies, every rank gets its answer. The
`deepspeed/` folder is closed: a file in it that the manifest does not list is refused, so what DeepSpeed or FSDP
unpickle is byte for byte what this run wrote.

Resume (`train.resume: true`) compares the recipe's run-shaping values, the processes and the data fingerprint with
the checkpoint's `run.json`, and refuses any change not listed in `train.resume_allow_changes` with one message naming
each (old -> new). Allowed changes take effect from the resume step (a new schedule is evaluated at the current step;
new AdamW hyper-parameters apply; a changed batch geometry keeps the position in the epoch, counted in micro-batches
per rank) and are recorded in `run.json` of every later checkpoint and in the log. The frozen weights' fingerprint and
the trainable parameters' names and shapes must match: no override.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import DistributedType
from safetensors.torch import load_file, save_file

from config import Recipe, recipe_to_dict
from config.schema import RESUME_KEYS_COMMON, RESUME_KEYS_DPO, RESUME_KEYS_GRPO
from data.plan_table import PlanTable, fingerprint_line
from rundir.layout import FAILED, MANIFEST, STEP, checkpoint_name
from rundir.manifest import ManifestError
from rundir.weights import manifest_file, verify_folder, write_folder_manifest

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "loop_state.json"
RUN_FILE = "run.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
DEEPSPEED_DIR = "deepspeed"
SAMPLE_VALUES = 4096  # values per frozen tensor in its fingerprint


class ResumeRefused(ValueError):
    """The checkpoint cannot be continued as the recipe asks (changed values, other weights, older format)."""


# ----------------------------------------------------------------------------------------------- what shaped the run


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def shaping_values(recipe: Recipe, stage: str, world_size: int) -> dict:
    """The recipe values that shape `stage`, plus the number of processes (the data fingerprint is added by fit)."""
    tree = recipe_to_dict(recipe)
    keys = [k for k in RESUME_KEYS_COMMON if k not in ("world_size", "data")]
    if stage == "dpo":
        keys += RESUME_KEYS_DPO
    if stage == "grpo":
        keys += RESUME_KEYS_GRPO
    values = {key: _lookup(tree, key) for key in keys}
    values["world_size"] = world_size
    return json.loads(json.dumps(values))  # tuples as lists: the form run.json reads back


def data_fingerprint(planned) -> str:
    """sha256 over the planned samples' origins, token counts and image token counts, in order (a PlanTable
    computes the same digest from its arrays, or has it from the plan cache)."""
    if isinstance(planned, PlanTable):
        return planned.data_fingerprint()
    digest = hashlib.sha256()
    for plan in planned:
        digest.update(fingerprint_line(plan.sample.origin, plan.num_tokens, plan.image_token_counts))
    return digest.hexdigest()


@torch.no_grad()
def frozen_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over each frozen parameter's name, shape, dtype and an evenly strided sample of its values (up to
    SAMPLE_VALUES, as float32): cheap on a 4B model, and any other base, revision, dtype or merged SFT adapter shows."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLE_VALUES)][:SAMPLE_VALUES]
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(sample.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainable_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def changed_values(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old, new)} for each shaping value that differs (a key only one side records counts as changed)."""
    missing = "(not recorded)"
    return {
        key: (old.get(key, missing), new.get(key, missing))
        for key in sorted(old.keys() | new.keys())
        if old.get(key, missing) != new.get(key, missing)
    }


def refuse_changes(changes: dict[str, tuple], allowed, checkpoint: Path) -> None:
    """Raise ResumeRefused naming each change `allowed` does not list."""
    refused = {key: change for key, change in changes.items() if key not in allowed}
    if refused:
        lines = "\n".join(f"  {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in refused.items())
        raise ResumeRefused(
            f"refusing to resume from {checkpoint}: the recipe changed values that shape the run since it was "
            f"written:\n{lines}\nThe checkpoint continues the run it was written for. Fix: restore those values, start "
            f"a new run (another output_dir), or accept the changes from this step on with "
            f"train.resume_allow_changes=[{','.join(refused)}]"
        )


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def latest_checkpoint(directory: Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


_VERIFIED: dict[
    Path, tuple
] = {}  # checkpoint -> `_stamp` when it passed (check_resume, then restore: hashed once)


def _stamp(folder: Path) -> tuple:
    """Each file's path, size and modification time: what a change to the folder after it passed would alter."""
    return tuple(
        sorted(
            (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()
        )
    )


def verify_checkpoint(folder: Path) -> None:
    """Raise ManifestError naming the first file of the checkpoint that is not as its manifest records."""
    if not manifest_file(folder).is_file():
        raise ManifestError(
            f"it holds no {MANIFEST}: an older version wrote it (an older one still used accelerate's pickle format, "
            "which is never loaded: unpickling can run code), or it was copied without it"
        )
    stamp = _stamp(folder)
    if _VERIFIED.get(folder.resolve()) == stamp:
        return
    verify_folder(folder, closed=(DEEPSPEED_DIR,))
    _VERIFIED[folder.resolve()] = stamp


def newest_intact(directory: Path) -> Path | None:
    """The newest checkpoint that passes its manifest (None when there is none at all). Each newer one that fails is
    logged with the file and why and renamed `.failed-step-N`; ResumeRefused when every checkpoint fails."""
    recover_replaced(directory)
    failures = []
    for folder in reversed(checkpoints(directory)):
        try:
            verify_checkpoint(folder)
            return folder
        except ManifestError as error:
            aside = folder.with_name(f"{FAILED}{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            failures.append(f"  {folder.name}: {error}")
            log.warning(
                "checkpoint %s is not intact: %s. Moved aside to %s (kept, never resumed); trying the "
                "checkpoint before it",
                folder,
                error,
                aside.name,
            )
    if failures:
        raise ResumeRefused(
            f"refusing to resume from {directory}: no checkpoint there is intact (each was moved aside to "
            f"{FAILED}step-N):\n"
            + "\n".join(failures)
            + "\nFix: restore a checkpoint from a copy, or start a new "
            "run (another output_dir, or overwrite_output_dir=true)"
        )
    return None


def intact_checkpoint(directory: Path, accelerator=None) -> Path | None:
    """`newest_intact` decided by the main process and given to every rank (the same answer, or the same refusal)."""
    answer: list = [None, None]
    if accelerator is None or accelerator.is_main_process:
        try:
            found = newest_intact(Path(directory))
            answer[0] = None if found is None else str(found)
        except ResumeRefused as refused:
            answer[1] = str(refused)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer, from_process=0)
    if answer[1] is not None:
        raise ResumeRefused(answer[1])
    return None if answer[0] is None else Path(answer[0])


def check_resume(
    recipe: Recipe, stage: str, directory: Path, world_size: int, accelerator=None
) -> Path | None:
    """Before anything is loaded or written: the newest intact checkpoint, refused (ResumeRefused) when the recipe
    changed a run-shaping value it does not allow; None when there is nothing to resume."""
    latest = intact_checkpoint(directory, accelerator)
    if latest is None:
        return None
    record = read_run_record(latest)
    new = shaping_values(recipe, stage, world_size)
    old = {k: v for k, v in record["values"].items() if k != "data"}
    refuse_changes(changed_values(old, new), recipe.train.resume_allow_changes, latest)
    return latest


def read_run_record(checkpoint: Path) -> dict:
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise ResumeRefused(
            f"{checkpoint} holds no {RUN_FILE}: it was written by an older version in accelerate's pickle format, "
            "which is never loaded (unpickling can run code). Fix: start a new run, or resume with the version that "
            "wrote it"
        )
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT:
        raise ResumeRefused(
            f"{checkpoint} is in checkpoint format {record.get('format')!r}; this version reads {FORMAT}"
        )
    return record


# ----------------------------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (so the names are durable too)."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
    for root, _, _ in os.walk(folder, topdown=False):
        _fsync(Path(root))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def _flat_items(entry: dict, prefix: str = ""):
    """(path, value) of an optimizer state entry; nested dicts (bitsandbytes' 8-bit optimizers keep their quantised
    moments under `__bnb_optimizer_quant_state__`) become `outer/inner` paths."""
    for key, value in entry.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _set_nested(entry: dict, path: str, value) -> None:
    *outer, name = path.split("/")
    for key in outer:
        entry = entry.setdefault(key, {})
    entry[name] = value


def _json_groups(groups: list[dict]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def _tuple_groups(groups: list[dict]) -> list[dict]:
    return [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups
    ]


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return values, tensors


def set_rng_state(values: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


# ----------------------------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores a stage's training state. `record` is this run's run.json (values, fingerprints, trainable
    shapes); `model` is the prepared model, `optimizer` and `scheduler` the stage's."""

    def __init__(
        self,
        accelerator,
        directory: Path,
        keep: int,
        *,
        model,
        optimizer,
        scheduler,
        record: dict,
        allowed: tuple[str, ...] = (),
    ):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep = keep
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.record = {"format": FORMAT, "allowed_changes": [], **record}
        self.allowed = tuple(allowed)
        self.last_saved_step: int | None = None
        # DeepSpeed's engine and FSDP's sharding own the optimizer and the weights' layout.
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.engine_owned = self.deepspeed or accelerator.distributed_type == DistributedType.FSDP

    # --------------------------------------------------------------------------------------------- save

    def save(self, state) -> Path:
        name = checkpoint_name(state.step)
        final, staging = self.directory / name, self.directory / f".tmp-{name}"
        unwrapped = self.accelerator.unwrap_model(self.model)
        acc = self.accelerator
        if acc.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        acc.wait_for_everyone()
        if self.engine_owned:  # the engine owns optimizer and partitions: its own (torch.save) checkpoint
            lean = {"exclude_frozen_parameters": True} if self.deepspeed else {}
            acc.save_state(str(staging / DEEPSPEED_DIR), **lean)
        elif acc.is_main_process:
            self._save_weights_and_optimizer(staging, unwrapped)
        values, tensors = rng_state()
        _write_json(staging / f"rng-{acc.process_index}.json", values)
        save_file(tensors, str(staging / f"rng-{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_json(staging / SCHEDULER_FILE, self.scheduler.state_dict())
            _write_json(staging / RUN_FILE, self.record)
            state.save(staging / STATE_FILE)
            write_folder_manifest(staging)  # last: every file above, by size and sha256
            fsync_tree(staging)
            self._replace(staging, final)
            self.rotate()
        acc.wait_for_everyone()
        self.last_saved_step = state.step
        return final

    def _save_weights_and_optimizer(self, folder: Path, unwrapped) -> None:
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(folder / TRAINABLE_FILE))
        name_of = {id(p): n for n, p in unwrapped.named_parameters()}
        names = [name_of.get(id(p), "?") for g in self.optimizer.param_groups for p in g["params"]]
        full = self.optimizer.state_dict()
        tensors, scalars, seen = {}, {}, set()
        for index, entry in full["state"].items():
            for key, value in _flat_items(entry):
                if isinstance(value, torch.Tensor):
                    value = value.detach().cpu().contiguous()
                    # bitsandbytes shares one quantisation map between all parameters; safetensors stores each once
                    shared = value.untyped_storage().data_ptr() in seen
                    seen.add(value.untyped_storage().data_ptr())
                    tensors[f"{index}.{key}"] = value.clone() if shared else value
                else:
                    scalars.setdefault(str(index), {})[key] = value
        save_file(tensors, str(folder / OPTIMIZER_TENSORS))
        _write_json(
            folder / OPTIMIZER_FILE,
            {"param_groups": _json_groups(full["param_groups"]), "names": names, "scalars": scalars},
        )

    def _replace(self, staging: Path, final: Path) -> None:
        """Rename the complete `staging` to `final`; a complete `final` of the same step (saved before a restart) is
        moved aside first and deleted only once the new one is in place."""
        old = final.with_name(f".old-{final.name}")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        _fsync(self.directory)
        shutil.rmtree(old, ignore_errors=True)

    def rotate(self) -> None:
        for old in checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old)
            log.info("removed old checkpoint %s", old)

    # --------------------------------------------------------------------------------------------- restore

    def restore(self, state_cls):
        """Load the newest intact checkpoint into the prepared objects; returns its loop state, or None. Refuses
        (ResumeRefused) a checkpoint of other frozen weights, other trainable parameters, or changed run-shaping
        values `train.resume_allow_changes` does not list."""
        latest = intact_checkpoint(self.directory, self.accelerator)
        if latest is None:
            return None
        old = read_run_record(latest)
        if old["frozen_fingerprint"] != self.record["frozen_fingerprint"]:
            raise ResumeRefused(
                f"refusing to resume from {latest}: the frozen weights differ from those it was trained over (another "
                "base model, revision or dtype, or a changed SFT adapter under DPO); its trainable parameters would "
                "not fit them. Fix: load the same base, or start a new run"
            )
        if old["trainable"] != self.record["trainable"]:
            gone = sorted(old["trainable"].keys() - self.record["trainable"].keys())[:3]
            new = sorted(self.record["trainable"].keys() - old["trainable"].keys())[:3]
            raise ResumeRefused(
                f"refusing to resume from {latest}: the trainable parameters differ (only in the checkpoint: {gone}; "
                f"only now: {new}; or other shapes): the LoRA config or the trained parts changed. Fix: restore them, "
                "or start a new run"
            )
        changes = changed_values(old["values"], self.record["values"])
        refuse_changes(changes, self.allowed, latest)
        self._warn_foreign_files(latest)
        unwrapped = self.accelerator.unwrap_model(self.model)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.engine_owned:
            lean = {"load_module_strict": False} if self.deepspeed else {}  # frozen weights are not in it
            self.accelerator.load_state(str(latest / DEEPSPEED_DIR), **lean)
        else:
            self._load_weights_and_optimizer(latest, unwrapped)
        rank = self.accelerator.process_index
        set_rng_state(
            json.loads((latest / f"rng-{rank}.json").read_text(encoding="utf-8")),
            load_file(str(latest / f"rng-{rank}.safetensors")),
        )
        self.scheduler.load_state_dict(json.loads((latest / SCHEDULER_FILE).read_text(encoding="utf-8")))
        state = state_cls.load(latest / STATE_FILE)
        self.record["allowed_changes"] = list(old.get("allowed_changes", []))
        if changes:
            self._apply_changes(fresh)
            entry = {
                "step": state.step,
                "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()},
            }
            self.record["allowed_changes"].append(entry)
            log.warning(
                "resuming at step %d with changes allowed by train.resume_allow_changes: %s",
                state.step,
                "; ".join(f"{k}: {_show(o)} -> {_show(n)}" for k, (o, n) in changes.items()),
            )
        self.last_saved_step = state.step
        log.info("resumed from %s", latest)
        return state

    def _load_weights_and_optimizer(self, latest: Path, unwrapped) -> None:
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(latest / TRAINABLE_FILE)).items():
                params[name].copy_(tensor)
        meta = json.loads((latest / OPTIMIZER_FILE).read_text(encoding="utf-8"))
        name_of = {id(p): n for n, p in unwrapped.named_parameters()}
        names = [name_of.get(id(p), "?") for g in self.optimizer.param_groups for p in g["params"]]
        if meta["names"] != names:
            raise ResumeRefused(
                f"{latest}: the optimizer's parameters differ from this model's; start a new run"
            )
        state: dict[int, dict] = {}
        for key, tensor in load_file(str(latest / OPTIMIZER_TENSORS)).items():
            index, name = key.split(".", 1)
            _set_nested(state.setdefault(int(index), {}), name, tensor)
        for index, entry in meta["scalars"].items():
            for name, value in entry.items():
                _set_nested(state.setdefault(int(index), {}), name, value)
        self.optimizer.load_state_dict({"state": state, "param_groups": _tuple_groups(meta["param_groups"])})

    def _apply_changes(self, fresh: list[dict]) -> None:
        """Allowed changes from this step on: the new groups' hyper-parameters, the new schedule at the current step
        (every schedule of transformers' get_scheduler is a LambdaLR: lr = base_lr x lambda(step))."""
        groups = self.optimizer.param_groups
        for group, new in zip(groups, fresh):
            for key in ("betas", "eps", "weight_decay", "initial_lr"):
                if key in new:
                    group[key] = new[key]
        self.scheduler.base_lrs = [g["initial_lr"] for g in groups]
        step = self.scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def _warn_foreign_files(self, latest: Path) -> None:
        known = {
            STATE_FILE,
            RUN_FILE,
            TRAINABLE_FILE,
            OPTIMIZER_TENSORS,
            OPTIMIZER_FILE,
            SCHEDULER_FILE,
            DEEPSPEED_DIR,
            MANIFEST,
        }
        foreign = sorted(
            p.name for p in latest.iterdir() if p.name not in known and not p.name.startswith("rng-")
        )
        if foreign and self.accelerator.is_main_process:
            log.warning(
                "%s: ignoring files that are no part of a checkpoint (never loaded): %s",
                latest,
                ", ".join(foreign),
            )


def recover_replaced(directory: Path) -> None:
    """A crash between moving a same-step checkpoint aside and renaming its replacement in: put the old one back."""
    if not Path(directory).is_dir():
        return
    for old in Path(directory).glob(f".old-{STEP}*"):
        final = old.with_name(old.name[len(".old-") :])
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
            log.warning("restored %s, left aside by an interrupted save", final)


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoints, oldest first, intact or not (`verify_checkpoint` tells); a `.tmp-` directory is an interrupted
    save, a `.failed-` one failed its manifest: both are ignored."""
    if not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).iterdir() if p.name.startswith(STEP) and p.is_dir())
