"""train.preference.losses against TRL 1.16's own DPOTrainer loss code, run on random log-probs.

TRL computes its losses inside `DPOTrainer._compute_loss(model, inputs, ...)`. We call that method on a trainer made
with `__new__` (no model loading, no datasets) holding only the attributes the method reads, with a stand-in
"model" that returns chosen per-token log-probs the way TRL's fused LM head does (zero where the label is -100) and
reference log-probs passed as precomputed (`precompute_ref_logps=True`). Parity runs in float64 so that
atol=1e-6 measures formula differences, not rounding.
"""

from __future__ import annotations

import math
import typing
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from config.schema import LABEL_SMOOTHING_LOSSES, DpoLossType
from train.preference import losses as dpo_losses
from train.preference.losses import (
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_TYPES,
    combined_loss,
    preference_loss,
    reward_metrics,
    sft_nll_per_pair,
)

ATOL = 1e-6
BATCH, SEQ_LEN = 6, 14


class _SingleProcessAccelerator:
    """What `_compute_loss` asks of accelerate, as one process answers it: gathers are the identity."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


class _FusedHeadStandIn(torch.nn.Module):
    """Returns fixed per-token log-probs (2B, T-1) as TRL's fused LM head output; other per-token fields are 0."""

    def __init__(self, per_token_logps):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_trainer(loss_types, loss_weights=None, *, beta, label_smoothing=0.0):
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta = beta
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
    trainer.label_smoothing = label_smoothing
    trainer.f_divergence_type = "reverse_kl"
    trainer.use_weighting = False
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.accelerator = _SingleProcessAccelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


def random_batch(seed, batch=BATCH, dtype=torch.float64):
    """A TRL-shaped batch (rows: B chosen then B rejected) with random per-token log-probs, and its per-pair sums."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(2, 5, (2 * batch,), generator=gen)
    completion_len = torch.randint(1, SEQ_LEN - 4, (2 * batch,), generator=gen)
    positions = torch.arange(SEQ_LEN)
    completion_mask = (
        (positions >= prompt_len[:, None]) & (positions < (prompt_len + completion_len)[:, None])
    ).long()
    # Log-probs of whole completions spread over a few nats so that every loss sees both signs of its margins.
    per_token = -torch.rand(2 * batch, SEQ_LEN - 1, generator=gen, dtype=dtype) * 3
    per_token = (per_token * completion_mask[:, 1:]).requires_grad_()
    ref_logps = per_token.detach().sum(1) + torch.randn(2 * batch, generator=gen, dtype=dtype) * 3
    inputs = {
        "input_ids": torch.randint(0, 50, (2 * batch, SEQ_LEN), generator=gen),
        "attention_mask": (positions < (prompt_len + completion_len)[:, None]).long(),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_logps[:batch],
        "ref_rejected_logps": ref_logps[batch:],
    }
    return SimpleNamespace(inputs=inputs, per_token=per_token, num_tokens=completion_mask.sum(1))


def ours(batch):
    """The per-pair arguments our functions take, computed from the same batch as the training code will."""
    chosen, rejected = batch.per_token.sum(1).chunk(2)
    chosen_tokens, rejected_tokens = batch.num_tokens.chunk(2)
    return SimpleNamespace(
        logps=(chosen, rejected, batch.inputs["ref_chosen_logps"], batch.inputs["ref_rejected_logps"]),
        tokens={"chosen_num_tokens": chosen_tokens, "rejected_num_tokens": rejected_tokens},
    )


def trl_loss(batch, loss_types, loss_weights=None, **options):
    trainer = trl_trainer(loss_types, loss_weights, **options)
    trainer.model = _FusedHeadStandIn(batch.per_token)  # read for train/eval mode, and called as the policy
    loss = trainer._compute_loss(trainer.model, batch.inputs, return_outputs=False)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def single_pair(batch, index):
    rows = [index, BATCH + index]
    inputs = {key: value[rows] for key, value in batch.inputs.items() if not key.startswith("ref_")}
    inputs["ref_chosen_logps"] = batch.inputs["ref_chosen_logps"][index : index + 1]
    inputs["ref_rejected_logps"] = batch.inputs["ref_rejected_logps"][index : index + 1]
    return SimpleNamespace(inputs=inputs, per_token=batch.per_token[rows], num_tokens=batch.num_tokens[rows])


def trl_per_pair(batch, loss_type, **options):
    """TRL's loss for each pair alone (its loss is the mean over a batch, so a batch of one gives the pair's loss)."""
    return torch.stack(
        [trl_loss(single_pair(batch, index), [loss_type], **options)[0] for index in range(BATCH)]
    )


def test_loss_names_match_the_recipe_schema():
    assert set(LOSS_TYPES) == set(typing.get_args(DpoLossType))
    assert LABEL_SMOOTHING_LOSS_TYPES == LABEL_SMOOTHING_LOSSES


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_matches_trl_per_pair_and_on_the_batch(loss_type, beta):
    batch = random_batch(seed=len(loss_type))
    args = ours(batch)
    losses_B = preference_loss(loss_type, *args.logps, beta=beta, **args.tokens)
    assert losses_B.shape == (BATCH,)
    torch.testing.assert_close(losses_B, trl_per_pair(batch, loss_type, beta=beta), atol=ATOL, rtol=0)
    trl_mean, _ = trl_loss(batch, [loss_type], beta=beta)
    torch.testing.assert_close(losses_B.mean(), trl_mean, atol=ATOL, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_robust_label_smoothing_matches_trl(label_smoothing):
    batch = random_batch(seed=11)
    losses_B = preference_loss("robust", *ours(batch).logps, beta=0.1, label_smoothing=label_smoothing)
    expected_B = trl_per_pair(batch, "robust", beta=0.1, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses_B, expected_B, atol=ATOL, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_sigmoid_label_smoothing_is_conservative_dpo_as_trl_writes_it(label_smoothing):
    # TRL 1.16's sigmoid ignores label_smoothing; its 'aot' loss applies the cDPO formula to sorted margins, and on
    # a batch of one pair sorting is the identity, so per pair 'aot' is cDPO exactly.
    batch = random_batch(seed=12)
    losses_B = preference_loss("sigmoid", *ours(batch).logps, beta=0.2, label_smoothing=label_smoothing)
    expected_B = trl_per_pair(batch, "aot", beta=0.2, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses_B, expected_B, atol=ATOL, rtol=0)
    plain_B = preference_loss("sigmoid", *ours(batch).logps, beta=0.2)
    assert not torch.allclose(losses_B, plain_B), "label smoothing must change the sigmoid loss"


@pytest.mark.parametrize(
    ("terms", "sft_weight"),
    [
        ([("sigmoid", 0.8), ("bco_pair", 0.2)], 1.0),  # MPO as in TRL's docs
        ([("ipo", 0.5), ("hinge", 2.0), ("apo_zero", 0.3)], 0.0),
        ([("sigmoid", 1.0)], 0.7),  # RPO
        ([], 1.0),  # SFT alone
    ],
)
def test_combined_loss_matches_trl_value_and_gradients(terms, sft_weight):
    batch = random_batch(seed=21)
    args = ours(batch)
    nll_B = sft_nll_per_pair(args.logps[0], args.tokens["chosen_num_tokens"]) if sft_weight else None
    loss_B, metrics = combined_loss(
        terms, *args.logps, beta=0.1, sft_weight=sft_weight, chosen_nll_per_pair=nll_B, **args.tokens
    )
    (ours_grad,) = torch.autograd.grad(loss_B.mean(), batch.per_token)

    types = [loss_type for loss_type, _ in terms] + ["sft"] * (sft_weight > 0)
    weights = [weight for _, weight in terms] + [sft_weight] * (sft_weight > 0)
    trl_value, _ = trl_loss(batch, types, weights, beta=0.1)
    (trl_grad,) = torch.autograd.grad(trl_value, batch.per_token)
    torch.testing.assert_close(loss_B.mean(), trl_value, atol=ATOL, rtol=0)
    # Only completion positions carry log-probs that depend on the model (the fused head writes 0 elsewhere).
    completion_positions = batch.inputs["completion_mask"][:, 1:].bool()
    torch.testing.assert_close(
        ours_grad[completion_positions], trl_grad[completion_positions], atol=ATOL, rtol=0
    )
    assert set(metrics) == {f"loss/{loss_type}" for loss_type in types}


def test_combined_loss_is_the_weighted_sum_of_its_terms():
    args = ours(random_batch(seed=22))
    loss_B, metrics = combined_loss(
        [("robust", 0.25), ("sigmoid", 2.0)], *args.logps, beta=0.1, label_smoothing=0.2
    )
    robust_B = preference_loss("robust", *args.logps, beta=0.1, label_smoothing=0.2)
    sigmoid_B = preference_loss("sigmoid", *args.logps, beta=0.1, label_smoothing=0.2)
    torch.testing.assert_close(loss_B, 0.25 * robust_B + 2.0 * sigmoid_B)
    torch.testing.assert_close(metrics["loss/robust"], robust_B.mean())


def test_sft_term_with_step_normalisation_is_the_token_mean_over_the_step():
    args = ours(random_batch(seed=23))
    chosen_logps, chosen_tokens = args.logps[0], args.tokens["chosen_num_tokens"]
    nll_B = sft_nll_per_pair(chosen_logps, chosen_tokens, num_pairs=4 * BATCH, num_tokens=1000)
    # A loop dividing the step's summed pair losses by its 4B pairs gets -sum(logps) / 1000 tokens.
    torch.testing.assert_close(nll_B.sum() / (4 * BATCH), -chosen_logps.sum() / 1000)


def test_reward_metrics_match_trl():
    batch = random_batch(seed=31)
    _, trl_metrics = trl_loss(batch, ["sigmoid"], beta=0.3)
    metrics = reward_metrics(*ours(batch).logps, beta=0.3)
    for name in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=ATOL), name
    assert 0 < metrics["rewards/accuracies"] < 1, "the fixture should have pairs ranked both ways"


def test_kl_is_the_k2_estimate_over_both_completions():
    ref = torch.tensor([-10.0, -20.0])
    metrics = reward_metrics(
        ref + torch.tensor([2.0, 0.0]), ref + torch.tensor([0.0, -2.0]), ref, ref, beta=0.1
    )
    assert metrics["kl"].item() == pytest.approx((0.5 * 4 + 0.5 * 4) / 4)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_policy_equal_to_reference_gives_log_2_and_zero_margins(beta):
    logps = -torch.rand(5, dtype=torch.float64) * 40
    other = -torch.rand(5, dtype=torch.float64) * 40
    losses_B = preference_loss("sigmoid", logps, other, logps.clone(), other.clone(), beta=beta)
    torch.testing.assert_close(losses_B, torch.full_like(losses_B, math.log(2)), atol=1e-12, rtol=0)
    metrics = reward_metrics(logps, other, logps.clone(), other.clone(), beta=beta)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl"):
        assert metrics[name].item() == 0, name


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_reach_the_policy_only(loss_type):
    gen = torch.Generator().manual_seed(41)
    policy = (-torch.rand(2, 4, generator=gen) * 20).requires_grad_()
    ref = (-torch.rand(2, 4, generator=gen) * 20).requires_grad_()
    counts = torch.tensor([3, 5, 7, 9])
    smoothing = 0.1 if loss_type in LABEL_SMOOTHING_LOSS_TYPES else 0.0
    losses_B = preference_loss(
        loss_type,
        policy[0],
        policy[1],
        ref[0],
        ref[1],
        beta=0.1,
        label_smoothing=smoothing,
        chosen_num_tokens=counts,
        rejected_num_tokens=counts.flip(0),
    )
    losses_B.sum().backward()
    assert ref.grad is None
    assert policy.grad is not None and policy.grad.abs().sum() > 0


def test_reference_free_is_a_zero_reference():
    args = ours(random_batch(seed=51))
    chosen, rejected = args.logps[:2]
    free_B = preference_loss("ipo", chosen, rejected, None, None, beta=0.1, **args.tokens)
    zero_B = preference_loss(
        "ipo", chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(chosen), beta=0.1, **args.tokens
    )
    torch.testing.assert_close(free_B, zero_B, atol=0, rtol=0)
    with pytest.raises(ValueError, match="exactly one of ref_chosen_logps"):
        preference_loss("sigmoid", chosen, rejected, None, rejected.detach(), beta=0.1)


@pytest.mark.parametrize("loss_type", sorted(set(LOSS_TYPES) - LABEL_SMOOTHING_LOSS_TYPES))
def test_label_smoothing_is_refused_by_losses_without_it(loss_type):
    args = ours(random_batch(seed=61))
    with pytest.raises(ValueError, match=f"loss '{loss_type}' has no label smoothing"):
        preference_loss(loss_type, *args.logps, beta=0.1, label_smoothing=0.1, **args.tokens)
    with pytest.raises(ValueError, match=f"loss '{loss_type}' has no label smoothing"):
        combined_loss(
            [("sigmoid", 1.0), (loss_type, 1.0)], *args.logps, beta=0.1, label_smoothing=0.1, **args.tokens
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: preference_loss("dpo", *a.logps, beta=0.1), "unknown loss_type 'dpo'"),
        (lambda a: preference_loss("sigmoid", *a.logps, beta=0.0), "beta=0.0"),
        (lambda a: preference_loss("robust", *a.logps, beta=0.1, label_smoothing=0.5), r"outside \[0, 0.5\)"),
        (lambda a: preference_loss("ipo", *a.logps, beta=0.1), "needs chosen_num_tokens"),
        (lambda a: preference_loss("sigmoid", a.logps[0][:2], *a.logps[1:], beta=0.1), "same shape"),
        (lambda a: combined_loss([("sigmoid", 1.0), ("sigmoid", 0.5)], *a.logps, beta=0.1), "more than once"),
        (lambda a: combined_loss([("hinge", -1.0)], *a.logps, beta=0.1), "weight -1.0 of loss 'hinge'"),
        (
            lambda a: combined_loss([("sigmoid", 1.0)], *a.logps, beta=0.1, sft_weight=1.0),
            "chosen_nll_per_pair is None",
        ),
        (lambda a: combined_loss([], *a.logps, beta=0.1), "nothing to train"),
    ],
)
def test_bad_arguments_raise_with_the_culprit_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(ours(random_batch(seed=71)))


def test_module_documents_every_loss_formula():
    for loss_type in LOSS_TYPES:
        assert f"\n    {loss_type} " in dpo_losses.__doc__, loss_type
