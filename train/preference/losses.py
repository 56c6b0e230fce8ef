"""The DPO loss family on per-pair summed log-probs, numerically identical to TRL 1.16's `DPOTrainer`.

Every function here is pure torch on tensors of shape (B,), one entry per preference pair:

- `policy_chosen_logps`, `policy_rejected_logps`: log pi_theta(y|x) of the chosen / rejected completion, summed over
  its completion tokens (nats), with gradient. This is TRL's `per_token_logps.sum(dim=1)` (TRL's `ld_alpha` is not
  supported: pass plain sums).
- `ref_chosen_logps`, `ref_rejected_logps`: the same under the reference model. They are detached here, so gradients
  reach the policy only, whatever the caller passes. Pass `None` for both to train reference-free (log pi_ref := 0,
  what TRL < 1.0's `reference_free=True` did; TRL 1.16 has no such switch).

The log-ratios `chosen = policy_chosen - ref_chosen` and `rejected = policy_rejected - ref_rejected` enter every loss;
`delta = chosen - rejected` is the DPO implicit-reward margin divided by beta. TRL 1.16 (`_compute_loss`, default
`f_divergence_type="reverse_kl"`, `use_weighting=False`) defines, per pair:

    sigmoid    -logsigmoid(beta * delta)
    hinge      relu(1 - beta * delta)
    ipo        (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2, n = completion token count, >= 1
    robust     (-(1 - eps) * logsigmoid(beta * delta) + eps * logsigmoid(-beta * delta)) / (1 - 2 * eps)
    bco_pair   -logsigmoid(beta * chosen) - logsigmoid(-beta * rejected)
    sppo_hard  (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    nca_pair   -logsigmoid(beta * chosen) - 0.5 * logsigmoid(-beta * chosen) - 0.5 * logsigmoid(-beta * rejected)
    apo_zero   (1 - sigmoid(beta * chosen)) + sigmoid(beta * rejected)
    apo_down   sigmoid(beta * chosen) + (1 - sigmoid(beta * delta))

Two deliberate facts about TRL 1.16 that callers should know:

- `bco_pair` is stateless in TRL 1.16 (the running reward mean `delta` of TRL < 1.0 is gone), so it needs no state.
- TRL 1.16 reads `label_smoothing` for `robust` (and EXO/AOT, not offered here) and silently ignores it for `sigmoid`.
  Here `sigmoid` with `label_smoothing = eps > 0` is conservative DPO (cDPO, Mitchell 2023; TRL < 1.0's sigmoid):
  `-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta)`, the formula TRL 1.16 still applies in
  its `aot` loss (which equals it for one pair). With `eps = 0` it is TRL 1.16's sigmoid exactly. Every other loss
  rejects `label_smoothing != 0` instead of ignoring it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
)
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust"})
# The label smoothing rate is the probability that a preference label is flipped: at 0.5 the labels carry no
# information (robust divides by 1 - 2 * eps) and above it they would train the preference backwards.
MAX_LABEL_SMOOTHING = 0.5


def _sigmoid(chosen_B: Tensor, rejected_B: Tensor, beta: float, label_smoothing: float) -> Tensor:
    logits_B = beta * (chosen_B - rejected_B)
    if label_smoothing == 0:  # TRL 1.16's sigmoid, operation for operation
        return -F.logsigmoid(logits_B)
    return -(1 - label_smoothing) * F.logsigmoid(logits_B) - label_smoothing * F.logsigmoid(-logits_B)


def _robust(chosen_B: Tensor, rejected_B: Tensor, beta: float, label_smoothing: float) -> Tensor:
    # Unbiased under labels flipped with probability label_smoothing (rDPO, Chowdhury et al. 2024, eq. 12).
    logits_B = beta * (chosen_B - rejected_B)
    clean_B = -(1 - label_smoothing) * F.logsigmoid(logits_B)
    flipped_B = -label_smoothing * F.logsigmoid(-logits_B)
    return (clean_B - flipped_B) / (1 - 2 * label_smoothing)


def _hinge(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    return torch.relu(1 - beta * (chosen_B - rejected_B))


def _ipo(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    # Eq. 17 of the IPO paper with tau = beta; the log-ratios arrive already divided by their token counts.
    return (chosen_B - rejected_B - 1 / (2 * beta)) ** 2


def _bco_pair(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    return -F.logsigmoid(beta * chosen_B) - F.logsigmoid(-beta * rejected_B)


def _sppo_hard(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    # SPPO with hard win probabilities (1 for the chosen, 0 for the rejected): each log-ratio regresses to +-1/(2 beta).
    return (chosen_B - 0.5 / beta) ** 2 + (rejected_B + 0.5 / beta) ** 2


def _nca_pair(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    chosen_rewards_B, rejected_rewards_B = beta * chosen_B, beta * rejected_B
    return (
        -F.logsigmoid(chosen_rewards_B)
        - 0.5 * F.logsigmoid(-chosen_rewards_B)
        - 0.5 * F.logsigmoid(-rejected_rewards_B)
    )


def _apo_zero(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    # APO eq. 7: for chosen answers better than the model's own; pushes chosen up and rejected down.
    return (1 - torch.sigmoid(beta * chosen_B)) + torch.sigmoid(beta * rejected_B)


def _apo_down(chosen_B: Tensor, rejected_B: Tensor, beta: float) -> Tensor:
    # APO eq. 8: for chosen answers worse than the model's own; pushes both down, the rejected further.
    return torch.sigmoid(beta * chosen_B) + (1 - torch.sigmoid(beta * (chosen_B - rejected_B)))


_SMOOTHED_LOSSES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
}
_PLAIN_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "hinge": _hinge,
    "ipo": _ipo,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
}
assert set(_SMOOTHED_LOSSES) | set(_PLAIN_LOSSES) == set(LOSS_TYPES)
assert set(_SMOOTHED_LOSSES) == LABEL_SMOOTHING_LOSS_TYPES


def _check_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        fix = f"use one of {', '.join(LOSS_TYPES)} (the SFT/RPO term is combined_loss's sft_weight)"
        raise ValueError(f"dpo_losses: unknown loss_type {loss_type!r}; no loss can be computed; {fix}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(
            f"dpo_losses: beta={beta!r} for loss {loss_type!r}; the losses scale by beta and ipo/sppo_hard divide "
            "by it, so it must be a finite number > 0; typical values are 0.01 to 0.5"
        )
    if label_smoothing != 0 and loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
        raise ValueError(
            f"dpo_losses: label_smoothing={label_smoothing!r} but loss {loss_type!r} has no label smoothing, so it "
            f"would be silently ignored; set label_smoothing=0.0, or use only "
            f"{' and '.join(sorted(LABEL_SMOOTHING_LOSS_TYPES))}"
        )
    if not 0 <= label_smoothing < MAX_LABEL_SMOOTHING:
        raise ValueError(
            f"dpo_losses: label_smoothing={label_smoothing!r} for loss {loss_type!r} is outside [0, 0.5); it is the "
            "probability that a preference label is flipped, and at 0.5 or above the labels say nothing or the "
            "opposite; use e.g. 0.1"
        )


def _check_pair_shapes(**tensors_B: Tensor | None) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors_B.items() if tensor is not None}
    if len(set(shapes.values())) > 1 or any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(
            f"dpo_losses: per-pair tensors must all have the same shape (B,), one entry per pair; got {shapes}; "
            "sum the per-token log-probs over each completion before calling"
        )


def log_ratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) log pi_theta / pi_ref per pair, (B,) each; the reference side is detached.

    `None` for both reference tensors means reference-free (log pi_ref := 0); `None` for only one is an error.
    """
    _check_pair_shapes(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "dpo_losses: exactly one of ref_chosen_logps / ref_rejected_logps is None; the two log-ratios would use "
            "different references; pass both (reference model) or neither (reference-free)"
        )
    if ref_chosen_logps is None:
        return policy_chosen_logps, policy_rejected_logps
    return (
        policy_chosen_logps - ref_chosen_logps.detach(),
        policy_rejected_logps - ref_rejected_logps.detach(),
    )


def _per_token(logratios_B: Tensor, num_tokens_B: Tensor | None, which: str) -> Tensor:
    if num_tokens_B is None:
        raise ValueError(
            f"dpo_losses: loss 'ipo' needs {which}_num_tokens (the number of completion tokens summed into each "
            f"{which} log-prob, shape (B,)); TRL 1.16's IPO averages log-ratios over them; pass them"
        )
    _check_pair_shapes(logratios=logratios_B, num_tokens=num_tokens_B)
    # TRL 1.16 divides by completion_mask.sum(dim=1).clamp(min=1): an empty completion counts as one token.
    return logratios_B / num_tokens_B.to(logratios_B.dtype).clamp(min=1)


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_num_tokens: Tensor | None = None,
    rejected_num_tokens: Tensor | None = None,
) -> Tensor:
    """Per-pair loss, shape (B,), not reduced: TRL 1.16's loss is its mean over the micro-batch.

    `beta` > 0 is TRL's `beta`. `label_smoothing` in [0, 0.5) is the flipped-label rate of `sigmoid` (cDPO) and
    `robust`; any other loss raises `ValueError` when it is not 0. `chosen_num_tokens` / `rejected_num_tokens` (B,)
    are required by `ipo` only: the number of completion tokens whose log-probs were summed into each
    `*_logps` entry, i.e. what TRL passes as `completion_mask.sum(dim=1)` (prompt and padding excluded, the EOS
    token included when it is part of the completion); counts below 1 are raised to 1 as TRL does.
    """
    _check_options(loss_type, beta, label_smoothing)
    chosen_B, rejected_B = log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if loss_type == "ipo":
        chosen_B = _per_token(chosen_B, chosen_num_tokens, "chosen")
        rejected_B = _per_token(rejected_B, rejected_num_tokens, "rejected")
    if loss_type in _SMOOTHED_LOSSES:
        return _SMOOTHED_LOSSES[loss_type](chosen_B, rejected_B, beta, label_smoothing)
    return _PLAIN_LOSSES[loss_type](chosen_B, rejected_B, beta)


def sft_nll_per_pair(
    policy_chosen_logps: Tensor,
    chosen_num_tokens: Tensor,
    *,
    num_pairs: int | None = None,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """TRL 1.16's `sft` loss term (the RPO NLL on the chosen completion), spread over pairs, shape (B,).

    TRL computes one number per micro-batch: the mean NLL over all chosen completion tokens of the batch,
    `-sum_b policy_chosen_logps[b] / sum_b chosen_num_tokens[b]` (a token mean, not a mean of per-pair means).
    Entry b here is `-policy_chosen_logps[b] * num_pairs / num_tokens`, so the mean over the B pairs is exactly
    TRL's number, with the same gradient. Defaults: `num_pairs = B` and `num_tokens = chosen_num_tokens.sum()` (TRL's
    per-micro-batch normalisation). A loop that divides the summed pair losses of a whole optimizer step by the
    step's global pair count can pass that pair count and the step's global chosen-token count instead, to get the
    token mean over the whole step. The DPO stage (train/core/losses.py) passes `num_pairs=1` and
    `num_tokens=chosen_num_tokens`: entry b is then pair b's own mean token NLL. The token count is raised to at
    least 1 (TRL gives NaN on a batch without chosen tokens; here the term is 0 then).
    """
    _check_pair_shapes(policy_chosen_logps=policy_chosen_logps, chosen_num_tokens=chosen_num_tokens)
    pairs = policy_chosen_logps.shape[0] if num_pairs is None else num_pairs
    tokens = chosen_num_tokens.sum() if num_tokens is None else num_tokens
    tokens = torch.as_tensor(tokens, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    return -policy_chosen_logps * (pairs / tokens.clamp(min=1))


def _check_terms(losses: Sequence[tuple[str, float]], sft_weight: float, nll_given: bool) -> None:
    types = [loss_type for loss_type, _ in losses]
    duplicates = sorted({loss_type for loss_type in types if types.count(loss_type) > 1})
    if duplicates:
        raise ValueError(
            f"dpo_losses.combined_loss: loss types {duplicates} are listed more than once in {list(losses)}; they "
            "would count twice; list each once with the sum of its weights"
        )
    for loss_type, weight in losses:
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(
                f"dpo_losses.combined_loss: weight {weight!r} of loss {loss_type!r} must be a finite number >= 0; "
                "a negative weight would maximise the loss"
            )
    if not (sft_weight >= 0 and math.isfinite(sft_weight)):
        raise ValueError(f"dpo_losses.combined_loss: sft_weight={sft_weight!r} must be a finite number >= 0")
    if not losses and sft_weight == 0:
        raise ValueError(
            "dpo_losses.combined_loss: no loss terms and sft_weight=0; nothing to train; list a loss"
        )
    if (sft_weight > 0) != nll_given:
        raise ValueError(
            f"dpo_losses.combined_loss: sft_weight={sft_weight!r} but chosen_nll_per_pair is "
            f"{'given' if nll_given else 'None'}; the SFT term needs both (a weight > 0 and the per-pair NLL from "
            "sft_nll_per_pair) or neither"
        )


def combined_loss(
    losses: Sequence[tuple[str, float]],
    *pair_logps: Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_nll_per_pair: Tensor | None = None,
    **num_tokens: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of preference losses plus an SFT term: TRL 1.16's `loss_type=[...]` with `loss_weights` (MPO).

    `losses` is a sequence of `(loss_type, weight)`; `pair_logps` are `preference_loss`'s four log-prob tensors
    (policy chosen, policy rejected, reference chosen, reference rejected) and `num_tokens` its `chosen_num_tokens` /
    `rejected_num_tokens`. `beta`, `label_smoothing` and the token counts are shared by all terms as in TRL (so `label_smoothing != 0` requires every listed loss to define it). The SFT term is TRL's
    `loss_type="sft"` (RPO): `sft_weight * chosen_nll_per_pair`, where `chosen_nll_per_pair` comes from
    `sft_nll_per_pair`; TRL's `loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]` is
    `losses=[("sigmoid", 1)], sft_weight=alpha`.

    Returns `(loss_B, metrics)`: `loss_B` (B,) per pair, whose mean over the micro-batch is TRL's loss; `metrics`
    maps `loss/<type>` (and `loss/sft`) to that term's unweighted mean over the pairs, detached 0-dim tensors.
    """
    _check_terms(losses, sft_weight, chosen_nll_per_pair is not None)
    if len(pair_logps) != 4 or set(num_tokens) - {"chosen_num_tokens", "rejected_num_tokens"}:
        raise TypeError(
            "dpo_losses.combined_loss takes the four log-prob tensors of preference_loss and only its "
            f"chosen_num_tokens / rejected_num_tokens, got {len(pair_logps)} and {sorted(num_tokens)}"
        )
    policy_chosen_logps = pair_logps[0]
    loss_B = torch.zeros_like(policy_chosen_logps)
    metrics: dict[str, Tensor] = {}
    for loss_type, weight in losses:
        term_B = preference_loss(
            loss_type, *pair_logps, beta=beta, label_smoothing=label_smoothing, **num_tokens
        )
        loss_B = loss_B + weight * term_B
        metrics[f"loss/{loss_type}"] = term_B.detach().mean()
    if chosen_nll_per_pair is not None:
        _check_pair_shapes(policy_chosen_logps=policy_chosen_logps, chosen_nll_per_pair=chosen_nll_per_pair)
        loss_B = loss_B + sft_weight * chosen_nll_per_pair
        metrics["loss/sft"] = chosen_nll_per_pair.detach().mean()
    return loss_B, metrics


def reward_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> dict[str, Tensor]:
    """TRL 1.16's DPO reward metrics over the micro-batch, plus a KL estimate; detached 0-dim tensors.

    As TRL logs them (means over the pairs): `rewards/chosen` = beta * chosen log-ratio, `rewards/rejected` likewise,
    `rewards/margins` = their difference, `rewards/accuracies` = fraction of pairs whose chosen reward is strictly
    larger (ties count as wrong), `logps/chosen` / `logps/rejected` = the policy's summed log-probs (nats).
    Distributed: TRL gathers per-pair values before the mean; with equal micro-batches per rank the mean of these
    per-rank means is the same number.

    `kl` (not a TRL DPO metric): Schulman's k2 estimator 0.5 * (log pi_theta - log pi_ref)^2 of KL(pi_theta || pi_ref),
    per completion at sequence level (nats), averaged over the 2B chosen and rejected completions. It is >= 0 and 0
    exactly when policy and reference agree on these completions, and never overflows (k3 would, as DPO drives
    rejected log-ratios far below 0). It is a drift monitor, not an unbiased KL: the completions come from the
    dataset, not from the policy.
    """
    chosen_B, rejected_B = log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen_rewards_B, rejected_rewards_B = beta * chosen_B.detach(), beta * rejected_B.detach()
    logratios_2B = torch.cat([chosen_B.detach(), rejected_B.detach()])
    return {
        "rewards/chosen": chosen_rewards_B.mean(),
        "rewards/rejected": rejected_rewards_B.mean(),
        "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).float().mean(),
        "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
        "kl": (0.5 * logratios_2B**2).mean(),
    }
