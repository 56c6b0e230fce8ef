"""train.rl.losses against TRL 1.16's own GRPOTrainer loss code, on random log-probs and advantages.

TRL computes the GRPO loss family inside `GRPOTrainer._compute_loss(model, inputs)`. We call that method on a trainer
made with `__new__` (no model, no datasets, no generation) holding only the attributes the method reads, with its
`_get_per_token_logps_and_entropies` replaced by one returning fixed per-token log-probs (what the model pass would
return), and compare the returned loss and the logged KL and clip ratios. The advantages TRL computes inline in
`_generate_and_score_completions` (not callable without a model and a generation); they are checked against its
formula with TRL's own `nanstd`. float64, atol=1e-6.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from train.rl import losses as grpo_losses
from train.rl.losses import (
    LOSS_TYPES,
    batch_loss,
    clip_metrics,
    completion_terms,
    group_advantages,
    per_token_loss,
    units,
)

ATOL = 1e-6
N, T, G, MAX_LEN = 8, 7, 4, 9


class _OneProcess:
    """What `_compute_loss` asks of accelerate, as one process answers it."""

    device = torch.device("cpu")
    num_processes = 1

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_trainer(loss_type, *, epsilon_low, epsilon_high, beta, logps):
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.loss_type = loss_type
    trainer.epsilon_low, trainer.epsilon_high, trainer.beta = epsilon_low, epsilon_high, beta
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.use_vllm = False
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=None)
    trainer.model = SimpleNamespace(training=True)
    trainer.current_gradient_accumulation_steps = 1
    trainer.max_completion_length = MAX_LEN
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer.accelerator = _OneProcess()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.args.steps_per_generation = 1
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    return trainer


def random_inputs(seed, old=True, ref=True):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    lengths[0] = 0  # an empty completion: TRL clamps its token count at 1
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    old_logps = logps + 0.3 * torch.randn(N, T, generator=gen, dtype=torch.float64) if old else None
    ref_logps = logps + 0.5 * torch.randn(N, T, generator=gen, dtype=torch.float64) if ref else None
    advantages = torch.randn(N, generator=gen, dtype=torch.float64)
    return logps, old_logps, ref_logps, advantages, mask


def trl_loss(loss_type, logps, old_logps, ref_logps, advantages, mask, *, epsilon_low, epsilon_high, beta):
    trainer = trl_trainer(
        loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, logps=logps
    )
    inputs = {
        "prompt_ids": torch.zeros(N, 3, dtype=torch.long),
        "prompt_mask": torch.ones(N, 3, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum().double(),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilons", [(0.2, 0.2), (0.2, 0.28)], ids=["symmetric", "clip_higher"])
@pytest.mark.parametrize("iterations", ["one", "several"])
def test_losses_equal_trl(loss_type, beta, epsilons, iterations):
    epsilon_low, epsilon_high = epsilons
    logps, old_logps, ref_logps, advantages, mask = random_inputs(
        zlib.crc32(repr((loss_type, beta, epsilons, iterations)).encode()),
        old=iterations == "several",
        ref=beta != 0,
    )
    expected, metrics = trl_loss(
        loss_type,
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
    )
    ours_NT, extra = per_token_loss(
        logps, old_logps, ref_logps, advantages, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta
    )
    ours = batch_loss(ours_NT, mask, loss_type, max_completion_length=MAX_LEN)
    assert float(ours) == pytest.approx(float(expected), abs=ATOL)
    # The loop's form: per-completion terms over the units give the same number.
    terms = completion_terms(ours_NT, mask, loss_type, max_completion_length=MAX_LEN)
    assert float(terms.sum() / units(mask, loss_type)) == pytest.approx(float(expected), abs=ATOL)
    clips = clip_metrics(extra["ratio"], advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    for key, value in clips.items():
        assert float(value) == pytest.approx(metrics[key][0], abs=ATOL), key
    if beta:
        kl = float((extra["kl"] * mask).sum() / mask.sum())
        assert kl == pytest.approx(metrics["kl"][0], abs=ATOL)


def test_gradients_equal_trl():
    logps, old_logps, ref_logps, advantages, mask = random_inputs(3)
    for loss_type in LOSS_TYPES:
        theirs = logps.clone().requires_grad_()
        trl_loss(
            loss_type,
            theirs,
            old_logps,
            ref_logps,
            advantages,
            mask,
            epsilon_low=0.2,
            epsilon_high=0.28,
            beta=0.04,
        )[0].backward()
        ours = logps.clone().requires_grad_()
        loss_NT, _ = per_token_loss(
            ours, old_logps, ref_logps, advantages, epsilon_low=0.2, epsilon_high=0.28, beta=0.04
        )
        batch_loss(loss_NT, mask, loss_type, max_completion_length=MAX_LEN).backward()
        torch.testing.assert_close(ours.grad, theirs.grad, atol=ATOL, rtol=0)


def trl_advantages(rewards, num_generations, scale_rewards):
    """TRL 1.16's sum_then_normalize block of `_generate_and_score_completions`, one reward function of weight 1."""
    mean = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages / (std + 1e-4) if scale_rewards != "none" else advantages


@pytest.mark.parametrize("scale_rewards", grpo_losses.SCALE_REWARDS)
def test_advantages_equal_trl_formula(scale_rewards):
    rewards = torch.rand(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours, _ = group_advantages(rewards, G, scale_rewards)
    torch.testing.assert_close(ours, trl_advantages(rewards, G, scale_rewards), atol=ATOL, rtol=0)


@pytest.mark.parametrize("scale_rewards", grpo_losses.SCALE_REWARDS)
def test_a_group_of_equal_rewards_has_zero_advantage(scale_rewards):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, G, scale_rewards)
    assert advantages[:G].abs().max() == 0
    assert advantages[G:].abs().min() > 0
    # ... and so its completions get no policy gradient (beta 0).
    logps = torch.zeros(N, T, dtype=torch.float64, requires_grad=True)
    loss_NT, _ = per_token_loss(logps, None, None, advantages, epsilon_low=0.2, epsilon_high=0.2, beta=0.0)
    batch_loss(loss_NT, torch.ones(N, T), "grpo", max_completion_length=T).backward()
    assert logps.grad[:G].abs().max() == 0 and logps.grad[G:].abs().max() > 0


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_losses.check_options("ppo", "group", 0.2, 0.2, 0.0)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_losses.check_options("grpo", "rank", 0.2, 0.2, 0.0)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4, "group")
