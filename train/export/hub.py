"""What an export hands to other people: the base's hub id, the model cards of the merged folder and of the adapter,
and the upload to the Hugging Face Hub (`python -m train.export RUN_DIR --push-to-hub ORG/NAME`).

Kept apart from `train/export/merge.py` (which merges weights) so that the two change independently. docs/export.md
describes the files and what differs from the hub's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from config import Recipe
from models.adapters import BASE_RECORD, FULL_WEIGHTS
from models.phi3v.export_files import remote_code_repo
from rundir.layout import adapter_dir, is_adapter, is_checkpoint, merged_dir, results_file, summary_file
from rundir.weights import base_hub_id

log = logging.getLogger("train.export.hub")
CARD = "README.md"


# ------------------------------------------------------------------------------------------------ the base


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


# ------------------------------------------------------------------------------------------------ model cards


def _scores(run_dir: Path) -> str:
    path = results_file(run_dir)
    if not path.is_file():
        return "No evaluation was run (`eval` was not among the recipe's stages).\n"
    results = json.loads(path.read_text(encoding="utf-8"))
    stages = [s for s in ("base", "sft", "dpo") if any(s in m for t in results.values() for m in t.values())]
    lines = ["| task | metric | " + " | ".join(stages) + " |", "|---" * (2 + len(stages)) + "|"]
    for task, metrics in sorted(results.items()):
        for metric, values in sorted(metrics.items()):
            cells = [f"{values[s]:.4f}" if isinstance(values.get(s), (int, float)) else "" for s in stages]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return (
        "Scores from `eval/results.json` of the run (held-out data of each task):\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _training(recipe: Recipe, run_dir: Path, stage: str) -> str:
    m, lora, t = recipe.model, recipe.lora, recipe.train
    lines = [
        f"- stages trained: {', '.join(s for s in recipe.stages if s in ('sft', 'dpo'))}; this model: after `{stage}`",
        f"- vision tower: {m.vision}, projector: {m.projector}, language model: {m.language}",
        f"- LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets {', '.join(lora.target_modules)}"
        + (f" (+ CLIP {', '.join(lora.vision_target_modules)})" if m.vision == "lora" else ""),
        f"- num_crops {m.num_crops}, max_length {recipe.data.max_length}, lr {t.lr}, batch {t.micro_batch_size} x "
        f"accumulation {t.grad_accum}, seed {recipe.seed}",
    ]
    if stage == "dpo" or "dpo" in recipe.stages:
        losses = " + ".join(f"{loss.weight} x {loss.type}" for loss in recipe.dpo.losses)
        lines.append(f"- DPO: loss {losses}, beta {recipe.dpo.beta}")
    for name in ("sft", "dpo"):
        path = summary_file(run_dir, name)
        if path.is_file():
            summary = json.loads(path.read_text(encoding="utf-8"))
            lines.append(
                f"- {name}: {summary.get('steps')} optimizer steps, {summary.get('samples')} samples, "
                f"{summary.get('seconds')} s"
            )
    sources = [f"`{s.path or s.format}` ({s.format}, split {s.split})" for s in recipe.data.train]
    lines.append("- training data: " + (", ".join(sources) if sources else "none listed"))
    return "\n".join(lines) + "\n"


def _front_matter(base_id: str, adapter: bool) -> str:
    lines = ["---"]
    if is_hub_id(base_id):
        lines.append(f"base_model: {base_id}")
    lines += [
        "library_name: " + ("peft" if adapter else "transformers"),
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- phi3_v",
        "- phi3v-tune",
        "- lora" if adapter else "- merged",
        "---",
        "",
    ]
    return "\n".join(lines)


def merged_card(
    recipe: Recipe, run_dir: Path, stage: str, *, base_id: str, repo_id: str | None = None
) -> str:
    where = repo_id or str(merged_dir(run_dir, stage))
    code = remote_code_repo(base_id, {})
    title = repo_id or f"{Path(run_dir).resolve().name}-{stage}"
    return (
        _front_matter(base_id, adapter=False)
        + f"""# {title}: {base_id} fine-tuned with phi3v-tune

Base model: `{base_id}`. The LoRA adapter(s) of the run were merged into the weights; the folder has the files of
the hub checkpoint (config with `auto_map` to `{code}`'s remote code, preprocessor config with the
`num_crops` used in training, tokenizer, generation config stopping at `<|end|>`).

## Training

{_training(recipe, run_dir, stage)}
## Evaluation

{_scores(run_dir)}
## Use

With phi3v-tune (transformers >= 5, no remote code):

```python
import models  # registers phi3_v with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained("{where}", dtype="bfloat16")
processor = AutoProcessor.from_pretrained("{where}")
```

With transformers and the official remote code (the pinned stack of the base model's card: transformers 4.40.2):

```python
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True, torch_dtype="auto",
                                             _attn_implementation="eager")
processor = AutoProcessor.from_pretrained("{where}", trust_remote_code=True)
prompt = "<|user|>\\n<|image_1|>\\nWhat does the chart show?<|end|>\\n<|assistant|>\\n"
inputs = processor(prompt, [image], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|end|>"))
```

With vLLM (the remote code's processor, so `--trust-remote-code`; vLLM has no LoRA for Phi-3-V, hence the merged
weights):

```bash
vllm serve {where} --trust-remote-code --max-model-len 8192 --limit-mm-per-prompt '{{"image": 1}}'
```

Generation should stop at `<|end|>`; `generation_config.json` lists it with `<|endoftext|>`.
"""
    )


def adapter_card(
    recipe: Recipe, run_dir: Path, stage: str, *, base_id: str, repo_id: str | None = None
) -> str:
    folder = adapter_dir(run_dir, stage)
    record_file = folder / BASE_RECORD
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    where = f'{repo_id}", subfolder="adapter' if repo_id else str(folder)
    full = (folder / FULL_WEIGHTS).is_file()
    after = record.get("applies_after") or []
    notes = []
    if full:
        notes.append(
            "Parts trained in full (the projector) are not in the PEFT adapter: they are in "
            "`full_weights.safetensors` under the base checkpoint's key names. Load them into the base "
            "before the adapter (below); without them the adapter gives a different model."
        )
    if after:
        notes.append(
            f"This adapter was trained on top of {len(after)} earlier adapter(s) merged into the base "
            f"({', '.join(after)}): merge those first (the run's merged export already has them)."
        )
    return (
        _front_matter(base_id, adapter=True)
        + f"""# LoRA adapter ({stage}) for {base_id}, trained with phi3v-tune

Base model: `{base_id}` (`base_model_name_or_path`); the local folder training read is recorded in
`base_model.json`. `adapter_config.json` holds only keys peft 0.11.1 and newer read; `target_modules` lists the
adapted modules by name.

{chr(10).join(notes)}

## Training

{_training(recipe, run_dir, stage)}
## Evaluation

{_scores(run_dir)}
## Use

With phi3v-tune (`models.adapters.apply_adapter` loads `full_weights.safetensors`, then the adapter):

```python
import models
from models.adapters import apply_adapter
model, processor = models.load("{base_id}", dtype="bfloat16")
model = apply_adapter(model, "{folder if not repo_id else "ADAPTER_FOLDER"}", merge=True)
```

With plain PEFT (any model class that has the hub's key names, the official remote code included):

```python
from peft import PeftModel
from safetensors.torch import load_file
model = AutoModelForCausalLM.from_pretrained("{base_id}", trust_remote_code=True, torch_dtype="auto")
{"model.load_state_dict(load_file('full_weights.safetensors'), strict=False)  # the projector trained in full" if full else "# no full-trained parts in this adapter"}
model = PeftModel.from_pretrained(model, "{where}")
```

vLLM cannot serve LoRA adapters for Phi-3-V: serve the merged export instead.
"""
    )


def write_cards(recipe: Recipe, run_dir: Path, stage: str, *, repo_id: str | None = None) -> list[Path]:
    base_id = base_hub_id(recipe, run_dir)
    written = []
    if is_checkpoint(merged_dir(run_dir, stage)):
        path = merged_dir(run_dir, stage) / CARD
        path.write_text(
            merged_card(recipe, run_dir, stage, base_id=base_id, repo_id=repo_id), encoding="utf-8"
        )
        written.append(path)
    if is_adapter(adapter_dir(run_dir, stage)):
        path = adapter_dir(run_dir, stage) / CARD
        path.write_text(
            adapter_card(recipe, run_dir, stage, base_id=base_id, repo_id=repo_id), encoding="utf-8"
        )
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ upload


def upload_plan(run_dir: Path, stage: str) -> list[tuple[Path, str]]:
    """(local folder, path in the repository): the merged folder at the root (what vLLM and `from_pretrained` read)
    and the adapter under `adapter/`; an adapter alone goes to the root."""
    merged, adapter = merged_dir(run_dir, stage), adapter_dir(run_dir, stage)
    plan = []
    if is_checkpoint(merged):
        plan.append((merged, ""))
    if is_adapter(adapter):
        plan.append((adapter, "adapter" if plan else ""))
    if not plan:
        raise FileNotFoundError(
            f"{run_dir}: the {stage} stage has neither a merged export nor an adapter to upload"
        )
    return plan


def push_to_hub(
    run_dir: Path,
    stage: str,
    repo_id: str,
    *,
    private: bool = True,
    dry_run: bool = False,
    endpoint: str | None = None,
) -> dict:
    """Create `repo_id` (if missing) and upload the stage's folders in one commit each. `dry_run` lists the files and
    the commit message and touches no network. The token comes from the environment (HF_TOKEN, or the cached
    login); it is never printed or logged."""
    plan = upload_plan(run_dir, stage)
    message = f"phi3v-tune export: {stage} stage of {Path(run_dir).name}"
    files = sorted(
        f"{prefix + '/' if prefix else ''}{p.relative_to(folder).as_posix()}"
        for folder, prefix in plan
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    report = {
        "repo_id": repo_id,
        "private": private,
        "commit_message": message,
        "files": files,
        "dry_run": dry_run,
    }
    if dry_run:
        return report
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commits = []
    for folder, prefix in plan:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            path_in_repo=prefix or None,
            commit_message=message,
            repo_type="model",
            ignore_patterns=[".*"],
        )
        commits.append(getattr(info, "commit_url", str(info)))
    log.info("uploaded %d files to %s", len(files), url)
    return {**report, "url": str(url), "commits": commits}
