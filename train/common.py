"""What SFT and DPO share: the accelerator, the model (hub id, local folder or the demo's tiny one), the optimizer
and schedule, moving batches, the preflight and saving the adapter."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed
from peft import PeftModel
from transformers import get_scheduler

import models
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.tiny import build_tiny_tokenizer, tiny_config

from .parts import PARTS, part_of, trainable_counts
from .recipe_schema import ModelSection, Recipe, TrainSection

log = logging.getLogger(__name__)

# The demo's tiny Phi-3-V: the real layout with small widths; CLIP on 32 px crops of 8 px patches.
# initializer_range 0.1, not 0.02: with a frozen random lm_head and final norm (LoRA trains neither), logits can
# only spread by about |norm(h)| * |lm_head row| = sqrt(128) * std * sqrt(128); at 0.02 that caps the gap between
# the answer and the rest near 2.6 nats, and the loss cannot fall below ~4.
TINY_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, vision_hidden_size=64,
                  vision_layers=3, crop_size=32, patch_size=8, initializer_range=0.1)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def make_accelerator(recipe: Recipe, run_dir: Path, grad_accum: int) -> Accelerator:
    # gloo where there is no GPU: the multi-process CPU runs (DDP, DeepSpeed) need it. A single process gets no
    # process group (asking for one without a launcher fails).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum, sync_with_dataloader=False),
        mixed_precision="bf16" if recipe.train.precision == "bf16" else "no",
        log_with=list(recipe.logging.report_to) or None,
        project_dir=str(run_dir / "logs"),
        kwargs_handlers=kwargs,
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(
            f"{accelerator.num_processes} processes but no distributed backend: launch CPU runs with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...` (launch.sh does), not bare torchrun"
        )
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3:
        raise RuntimeError(
            "DeepSpeed ZeRO-3 is not supported yet: it partitions the parameters at load time, so the preflight, "
            "the base eval and generation (which needs synced ranks) cannot run as written. Use "
            "recipes/accelerate/zero2.yaml (optimizer states and gradients sharded) or ddp.yaml"
        )
    log.info("accelerate: %s, %d process(es), device %s, mixed precision %s", accelerator.distributed_type,
             accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    set_seed(recipe.seed)
    return accelerator


def base_path(model_section: ModelSection, run_dir: Path) -> str:
    """Where a run's base weights are: the hub id or folder of the recipe, or run_dir/base for the demo's `tiny`."""
    return str(Path(run_dir) / "base") if model_section.name_or_path == "tiny" else model_section.name_or_path


def load_model(model_section: ModelSection, run_dir: Path, *, seed: int, accelerator: Accelerator):
    """(model, processor, base_path). `tiny` builds the demo model once into run_dir/base and loads it from there,
    so every later stage (DPO, eval, export) loads its base like any other checkpoint folder."""
    source = base_path(model_section, run_dir)
    if model_section.name_or_path == "tiny":
        with accelerator.main_process_first():
            if accelerator.is_main_process and not (Path(source) / "config.json").exists():
                tiny_model, tiny_processor = build_tiny(model_section, seed)
                save_atomically(Path(source), lambda tmp: (tiny_model.save_pretrained(tmp), tiny_processor.save_pretrained(tmp)))
    model, processor = models.load(source, revision=model_section.revision, dtype=model_section.dtype,
                                   attn_implementation=model_section.attn_implementation,
                                   num_crops=model_section.num_crops)
    return model, processor, source


def build_tiny(model_section: ModelSection, seed: int) -> tuple[Phi3VForCausalLM, Phi3VProcessor]:
    """The demo's tiny model and processor: a tokenizer trained on the synthetic data's texts, weights from `seed`."""
    from data.synthetic import synthetic_texts

    dims = dict(TINY_MODEL)
    crop_size, patch_size = dims.pop("crop_size"), dims.pop("patch_size")
    tokenizer = build_tiny_tokenizer(synthetic_texts())
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(tokenizer, crop_size=crop_size, patch_size=patch_size, **dims))
    image_processor = Phi3VImageProcessor(num_crops=model_section.num_crops, crop_size=crop_size, patch_size=patch_size)
    return model, Phi3VProcessor(image_processor, tokenizer)


def save_atomically(folder: Path, write) -> Path:
    """`write(tmp)` fills a temporary sibling folder, which then replaces `folder` in one rename."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def upcast_trainable_(model) -> None:
    """fp32 master copies of the trained parameters; the frozen base stays in the recipe's dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def make_optimizer(param_groups: list[dict], train: TrainSection, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    groups = [{**g, "lr": g["lr"] * lr_scale} for g in param_groups]
    fused = torch.cuda.is_available()  # the fused AdamW kernel is CUDA-only
    return torch.optim.AdamW(groups, betas=tuple(train.adam_betas), eps=train.adam_eps, fused=fused)


def make_scheduler(optimizer, train: TrainSection, total_steps: int):
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def prepare(accelerator: Accelerator, model, optimizer, micro_batch_size: int):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # No DataLoader goes through prepare (our samplers shard by rank themselves): tell DeepSpeed the batch.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    return accelerator.prepare(model, optimizer)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def report_trainable(model) -> str:
    counts = trainable_counts(model)
    lines = [f"  {part:<9} trainable {c['trainable']:>13,} of {c['total']:>13,}" for part, c in counts.items()]
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


def trained_parts(model_section: ModelSection) -> set[str]:
    modes = {"vision": model_section.vision, "projector": model_section.projector, "language": model_section.language}
    return {part for part, mode in modes.items() if mode != "frozen"}


def save_trained(accelerator: Accelerator, model, processor, folder: Path) -> Path:
    """The adapter in PEFT layout (LoRA), or the whole model in the hub layout (full fine-tuning), with the
    processor beside it, written atomically."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; a plain state dict otherwise
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            processor.save_pretrained(tmp)

        save_atomically(folder, write)
    accelerator.wait_for_everyone()
    return folder


def is_peft(model) -> bool:
    return isinstance(model, PeftModel)


def autocast_context(accelerator: Accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()



class Preempted(RuntimeError):
    """Raised by `stopper` after the given step (and its checkpoint), as a preemption would end a run."""


def stopper(stop_after_step: int | None):
    """An `on_step` callback for the loop that ends the run after `stop_after_step` optimizer steps."""
    if stop_after_step is None:
        return None

    def on_step(state) -> None:
        if state.step >= stop_after_step:
            raise Preempted(f"stopped after step {state.step} (stop_after_step={stop_after_step})")

    return on_step
