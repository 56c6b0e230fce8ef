"""The optimizer and the learning-rate schedule of a stage.

`train.optimizer`: `adamw` is torch's AdamW (fused on CUDA), with two float32 states per trained parameter;
`adamw_8bit` is bitsandbytes' blockwise 8-bit AdamW (the two states in 8 bits: 2 bytes per trained parameter instead
of 8; tensors under 4,096 elements keep 32-bit states), which runs on CPU and GPU in bitsandbytes 0.50;
`paged_adamw_8bit` keeps those states in CUDA unified memory, paged out to the host when the GPU runs short. Paging
needs CUDA: without it bitsandbytes silently runs the unpaged optimizer, so it is refused here instead, naming
`adamw_8bit`, which is what would run. All three take the same parameter groups (per-part learning rates, no decay on
norms and biases) and work for LoRA, QLoRA and full fine-tuning.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

from config import TrainSection

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def make_optimizer(
    param_groups: list[dict], train: TrainSection, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    groups = [{**g, "lr": g["lr"] * lr_scale} for g in param_groups]
    betas, eps = tuple(train.adam_betas), train.adam_eps
    if train.optimizer == "adamw":
        fused = torch.cuda.is_available()  # the fused AdamW kernel is CUDA-only
        return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused)
    if train.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.optimizer = 'paged_adamw_8bit': paging keeps the optimizer states in CUDA unified memory, and "
            "there is no CUDA device here (bitsandbytes would run it unpaged without saying so). Fix: set "
            "train.optimizer: adamw_8bit (the same 8-bit AdamW, unpaged; it runs on CPU), or adamw"
        )
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    # bitsandbytes' weight_decay default is 1e-2: every group sets its own (parameter_groups).
    return cls(groups, betas=betas, eps=eps, weight_decay=train.weight_decay)


def make_scheduler(optimizer, train: TrainSection, total_steps: int):
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
