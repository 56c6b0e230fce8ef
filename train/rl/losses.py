"""The GRPO loss family on per-token log-probs, numerically identical to TRL 1.16's `GRPOTrainer`.

Shapes follow TRL: N completions (the G completions of each prompt adjacent, prompt after prompt), T completion
positions, right-padded; `mask` (N, T) is 1 on a completion's tokens (its end token included) and 0 on padding.

- `group_advantages(rewards_N, G, scale_rewards)`: TRL's `sum_then_normalize` advantages. Each reward minus its
  group's mean; divided by the group's std (`group`), by the std of all N rewards (`batch`), or not (`none`), plus
  1e-4. The std is the unbiased one (TRL's `nanstd`). A group whose rewards are all equal has advantage 0.
- `per_token_loss(...)`: the clipped surrogate with importance ratio r = exp(logp - logp_old) per token:
  `-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)`, plus `beta * k3` where
  k3 = exp(ref - logp) - (ref - logp) - 1 is Schulman's KL estimator to the reference (TRL's `per_token_kl`).
  With one optimisation pass per generation `old` is `logp.detach()` (r = 1, TRL's shortcut); with
  `num_iterations > 1` it is the log-prob under the policy that sampled the completions.
- `batch_loss(...)`: TRL's value of one micro-batch (before its division by the gradient accumulation steps):
    grpo     mean over completions of (sum of the completion's token losses / its token count)
    bnpo     sum of token losses / tokens of the micro-batch
    dr_grpo  sum of token losses / (N * max_completion_length)
    dapo     sum of token losses / tokens of the whole generation batch (TRL's `num_items_in_batch`)
- `completion_terms(...)`: the same losses as one term per completion for the shared loop (train/core/loop.py), which
  divides the summed terms of an optimizer step by the step's units over all ranks: completions for grpo, bnpo and
  dr_grpo (so equal micro-batches give TRL's mean of micro-batch losses), completion tokens for dapo (TRL's global
  token normalisation). `units(...)` counts them.

tests/train/test_grpo_losses.py calls TRL's own `GRPOTrainer._compute_loss` on the same inputs and asserts equality (1e-6).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


def check_options(
    loss_type: str, scale_rewards: str, epsilon_low: float, epsilon_high: float, beta: float
) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_losses: unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"grpo_losses: unknown scale_rewards {scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}"
        )
    for name, value in (("epsilon", epsilon_low), ("epsilon_high", epsilon_high), ("beta", beta)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"grpo_losses: {name}={value!r} must be a finite number >= 0")


def _unbiased_std(values: Tensor, dim: int | None = None) -> Tensor:
    """TRL's `nanstd` on values without NaN: sqrt(mean((x - mean)^2) * n / (n - 1))."""
    if dim is None:
        mean = values.mean()
        count = values.numel()
        return torch.sqrt(((values - mean) ** 2).mean() * (count / (count - 1)))
    mean = values.mean(dim=dim, keepdim=True)
    count = values.shape[dim]
    return torch.sqrt(((values - mean) ** 2).mean(dim=dim) * (count / (count - 1)))


def group_advantages(rewards_N: Tensor, num_generations: int, scale_rewards: str) -> tuple[Tensor, Tensor]:
    """(advantages (N,), the std they were scaled by (N,)). `rewards_N` are the weighted sums of the reward
    functions, the G completions of a prompt adjacent; for `batch` scaling pass every rank's rewards (TRL gathers
    the generation batch across processes before it normalises)."""
    if rewards_N.dim() != 1 or rewards_N.numel() % num_generations:
        raise ValueError(
            f"grpo_losses: rewards of shape {tuple(rewards_N.shape)} are not groups of {num_generations}"
        )
    if num_generations < 2:
        raise ValueError(
            "grpo_losses: num_generations must be >= 2: a group of one has no baseline but itself"
        )
    grouped = rewards_N.view(-1, num_generations)
    mean_N = grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std_N = _unbiased_std(rewards_N).expand_as(rewards_N)
    elif scale_rewards in ("group", "none"):
        std_N = _unbiased_std(grouped, dim=1).repeat_interleave(num_generations)
    else:
        raise ValueError(
            f"grpo_losses: unknown scale_rewards {scale_rewards!r}; use one of {', '.join(SCALE_REWARDS)}"
        )
    advantages_N = rewards_N - mean_N
    if scale_rewards != "none":
        advantages_N = advantages_N / (std_N + STD_EPSILON)
    return advantages_N, std_N


def per_token_loss(
    logps_NT: Tensor,
    old_logps_NT: Tensor | None,
    ref_logps_NT: Tensor | None,
    advantages_N: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(per-token loss (N, T), per-token tensors for the metrics: `ratio`, `kl` when beta > 0)."""
    old_NT = logps_NT.detach() if old_logps_NT is None else old_logps_NT.detach()
    advantages_N1 = advantages_N.detach().unsqueeze(1)
    ratio_NT = torch.exp(logps_NT - old_NT)
    clipped_NT = torch.clamp(ratio_NT, 1 - epsilon_low, 1 + epsilon_high)
    loss_NT = -torch.min(ratio_NT * advantages_N1, clipped_NT * advantages_N1)
    extra = {"ratio": ratio_NT.detach()}
    if beta != 0.0:
        if ref_logps_NT is None:
            raise ValueError("grpo_losses: beta > 0 needs the reference log-probs (ref_logps_NT)")
        ref_NT = ref_logps_NT.detach()
        kl_NT = torch.exp(ref_NT - logps_NT) - (ref_NT - logps_NT) - 1
        loss_NT = loss_NT + beta * kl_NT
        extra["kl"] = kl_NT.detach()
    return loss_NT, extra


def batch_loss(
    loss_NT: Tensor,
    mask_NT: Tensor,
    loss_type: str,
    *,
    max_completion_length: int,
    num_items_in_batch: Tensor | float | None = None,
) -> Tensor:
    """TRL's loss of one micro-batch (module doc); `num_items_in_batch` (dapo): the completion tokens of the whole
    generation batch, all ranks (default: this micro-batch's)."""
    mask_NT = mask_NT.to(loss_NT.dtype)
    if loss_type == "grpo":
        return ((loss_NT * mask_NT).sum(-1) / mask_NT.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (loss_NT * mask_NT).sum() / mask_NT.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (loss_NT * mask_NT).sum() / (loss_NT.size(0) * max_completion_length)
    if loss_type == "dapo":
        items = mask_NT.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        return (loss_NT * mask_NT).sum() / items.clamp(min=1.0)
    raise ValueError(f"grpo_losses: unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def completion_terms(
    loss_NT: Tensor, mask_NT: Tensor, loss_type: str, *, max_completion_length: int
) -> Tensor:
    """One term per completion (N,) whose sum divided by `units(...)` summed over the step's micro-batches and ranks
    is the step's loss (module doc). For one micro-batch, `terms.sum() / units` equals `batch_loss`."""
    mask_NT = mask_NT.to(loss_NT.dtype)
    summed_N = (loss_NT * mask_NT).sum(-1)
    if loss_type == "grpo":
        return summed_N / mask_NT.sum(-1).clamp(min=1.0)
    if loss_type == "bnpo":  # the micro-batch's token mean, spread over its completions
        return summed_N * (loss_NT.size(0) / mask_NT.sum().clamp(min=1.0))
    if loss_type == "dr_grpo":
        return summed_N / max_completion_length
    if loss_type == "dapo":
        return summed_N
    raise ValueError(f"grpo_losses: unknown loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")


def units(mask_NT: Tensor, loss_type: str) -> int:
    """What the loop divides the step's summed terms by: completion tokens for dapo, completions otherwise."""
    return int(mask_NT.sum()) if loss_type == "dapo" else int(mask_NT.shape[0])


def clip_metrics(
    ratio_NT: Tensor, advantages_N: Tensor, mask_NT: Tensor, *, epsilon_low: float, epsilon_high: float
) -> dict[str, Tensor]:
    """TRL's clip ratios, as token means over the completion tokens: `clip_ratio/low_mean` (ratio below 1 - eps_low
    with a negative advantage), `clip_ratio/high_mean` (above 1 + eps_high, positive advantage) and
    `clip_ratio/region_mean` (either)."""
    advantages_N1 = advantages_N.unsqueeze(1)
    low = (ratio_NT < 1 - epsilon_low) & (advantages_N1 < 0)
    high = (ratio_NT > 1 + epsilon_high) & (advantages_N1 > 0)
    mask = mask_NT.to(ratio_NT.dtype)
    tokens = mask.sum().clamp(min=1.0)
    return {
        "clip_ratio/low_mean": (low.to(mask.dtype) * mask).sum() / tokens,
        "clip_ratio/high_mean": (high.to(mask.dtype) * mask).sum() / tokens,
        "clip_ratio/region_mean": ((low | high).to(mask.dtype) * mask).sum() / tokens,
    }
