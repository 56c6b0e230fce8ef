"""The optimizer and the learning-rate schedule of a stage."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from recipe import TrainSection


def make_optimizer(param_groups: list[dict], train: TrainSection, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    groups = [{**g, "lr": g["lr"] * lr_scale} for g in param_groups]
    fused = torch.cuda.is_available()  # the fused AdamW kernel is CUDA-only
    return torch.optim.AdamW(groups, betas=tuple(train.adam_betas), eps=train.adam_eps, fused=fused)


def make_scheduler(optimizer, train: TrainSection, total_steps: int):
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
