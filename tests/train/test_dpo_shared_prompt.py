"""DPO's prefix-sharing layout (one LM pass over each prompt for both completions) against the 2B-row layout: the
same per-pair log-probs, gradients and training losses, in fp32 on the tiny model.

Tolerances: summed log-probs (about -15 nats per completion) agree to atol 1e-5 (measured: <= 4e-6); each LoRA
gradient tensor to 1e-5 in relative Frobenius norm (float32 sums taken in another order: single entries near zero
differ by ~1e-6 absolute); losses of a 3-step run of train/dpo.py to rel 1e-5, grad norms to rel 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from config import load_recipe
from data.collate import SEGMENT_PAD, DPOCollator, RenderedDataset, shared_layout
from data.loaders import load_samples, loader_factory, plan
from data.sources import SkipCounter
from data.synthetic import DEMO_COUNTS, write_synthetic
from train.core import model_loading as common
from train.core.losses import completion_logps, prefix_sharing_mask, sft_loss_sum
from train.core.trainable import configure_trainable, dpo_parts
from train.preference.stage_loss import DPOLoss, pair_logps, shared_completion_logps, shares_prompt

from ..run_helpers import DEMO, history, run_stage, small_overrides

ATOL_LOGPS = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_synthetic(root, seed=0, n_train=8, n_eval=4, n_pref_train=24, n_pref_eval=4)
    recipe = load_recipe(
        DEMO,
        [
            f"data.train.0.path={root}",
            f"data.eval.0.path={root}",
            f"output_dir={root}/run",
            "dpo.sft_weight=0.0",
        ],
    )  # the sigmoid loss alone: log 2 at step 0
    _, processor = common.build_tiny(recipe.model, seed=0)
    skips = SkipCounter()
    samples = load_samples(
        recipe.data.train,
        "dpo",
        recipe.data,
        seed=0,
        skips=skips,
        main_first=Accelerator(cpu=True).main_process_first,
    )
    planned = plan(samples, processor, recipe.data, skips)
    make_loader, _ = loader_factory(
        planned, processor, recipe.data, stage="dpo", micro_batch_size=8, seed=0, num_replicas=1, rank=0
    )
    batches = list(make_loader(0))
    return recipe, processor, planned, batches


def policy(recipe, attn: str = "sdpa"):
    """The tiny model with a fresh LoRA whose weights are all random (so that the policy differs from the base)."""
    model, _ = common.build_tiny(replace(recipe.model, attn_implementation=attn), seed=0)
    model = configure_trainable(model, dpo_parts(recipe.model), recipe.lora, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def test_batches_carry_the_shared_layout_with_text_only_pairs(setup):
    _, _, _, batches = setup
    assert all("shared_input_ids" in b for b in batches)
    assert any("pixel_values" in b for b in batches)
    assert any(images == [] for b in batches for images in b["sequence_images"])  # text-only pairs too
    for batch in batches:
        pairs = batch["input_ids"].shape[0] // 2
        assert batch["shared_input_ids"].shape[0] == pairs
        # The RoPE long/short switch reads the largest position id: the same in both layouts.
        assert int(batch["shared_position_ids"].max()) + 1 == batch["input_ids"].shape[1]
        # Every supervised token of the 2B rows is read once.
        assert batch["shared_targets"].numel() == int((batch["labels"][:, 1:] != -100).sum())
        # Fewer LM tokens: each prompt once.
        assert batch["shared_input_ids"].numel() < batch["input_ids"].numel()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_layout_gives_the_same_log_probs_and_gradients(setup, attn):
    recipe, _, _, batches = setup
    model = policy(recipe, attn)
    lora = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        kwargs, _ = DPOLoss.image_kwargs_for(model, batch, share_features=True)
        results = []
        for fn in (completion_logps, shared_completion_logps):
            model.zero_grad(set_to_none=True)
            logps, counts = fn(model, batch, kwargs)
            (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
            results.append((logps.detach(), counts, [p.grad.clone() for p in lora]))
        (two_rows, counts_2b, grads_2b), (shared, counts_shared, grads_shared) = results
        assert counts_2b.tolist() == counts_shared.tolist()
        torch.testing.assert_close(shared, two_rows, atol=ATOL_LOGPS, rtol=0)
        for a, b in zip(grads_shared, grads_2b):
            assert (a - b).norm() <= 1e-5 * b.norm(), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("layout", ["shared", "2b"])
def test_real_token_forward_gives_the_models_log_probs_and_gradients(setup, layout, checkpointing):
    """Both layouts' log-probs from the decoder on the real tokens (the last layer at the kept positions) equal the
    model's forward's, with and without gradient checkpointing; the first layer sees only the real tokens (twice
    under checkpointing: the backward recomputes it)."""
    recipe, _, _, batches = setup
    model = policy(recipe)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    model.train()
    lora = [p for p in model.parameters() if p.requires_grad]
    rows_seen: list[int] = []
    mlp = model.get_base_model().model.layers[0].mlp
    hook = mlp.register_forward_pre_hook(lambda _m, args: rows_seen.append(args[0].shape[:-1].numel()))
    fn = shared_completion_logps if layout == "shared" else completion_logps
    for batch in batches:
        kwargs, _ = DPOLoss.image_kwargs_for(model, batch, share_features=True)
        results = []
        for real_tokens in (False, True):
            model.zero_grad(set_to_none=True)
            rows_seen.clear()
            logps, counts = fn(model, batch, kwargs, real_tokens=real_tokens)
            (logps * torch.linspace(0.5, 1.5, logps.numel())).sum().backward()
            results.append((logps.detach(), counts, [p.grad.clone() for p in lora], list(rows_seen)))
        (full, counts_full, grads_full, rows_full), (fast, counts_fast, grads_fast, rows_fast) = results
        ids = batch["shared_input_ids"] if layout == "shared" else batch["input_ids"]
        real = (
            int((batch["shared_segments"] != SEGMENT_PAD).sum())
            if layout == "shared"
            else int(batch["attention_mask"].sum())
        )
        calls = 2 if checkpointing else 1
        assert rows_full == [ids.numel()] * calls and rows_fast == [real] * calls
        assert counts_full.tolist() == counts_fast.tolist()
        torch.testing.assert_close(fast, full, atol=ATOL_LOGPS, rtol=0)
        for a, b in zip(grads_fast, grads_full):
            assert (a - b).norm() <= 1e-5 * b.norm(), float((a - b).norm() / b.norm())
    hook.remove()


def test_long_rope_switch_is_the_same_in_both_layouts(setup):
    """With the long/short switch at 48 tokens, batches cross it (some rows longer, some shorter): same log-probs."""
    recipe, processor, _, batches = setup
    model = policy(recipe)
    config = model.get_base_model().config
    config.rope_parameters["original_max_position_embeddings"] = 48
    model.get_base_model().model.rotary_emb.config.rope_parameters["original_max_position_embeddings"] = 48
    crossing = [b for b in batches if b["input_ids"].shape[1] > 48]
    assert crossing
    with torch.no_grad():
        for batch in crossing:
            kwargs, _ = DPOLoss.image_kwargs_for(model, batch, share_features=True)
            torch.testing.assert_close(
                shared_completion_logps(model, batch, kwargs)[0],
                completion_logps(model, batch, kwargs)[0],
                atol=ATOL_LOGPS,
                rtol=0,
            )


def test_block_mask_hides_the_chosen_completion_from_the_rejected_one():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, SEGMENT_PAD]])
    mask = prefix_sharing_mask(segments, "sdpa", torch.float32)[0, 0]
    assert mask[4, :4].tolist() == [
        True,
        True,
        False,
        False,
    ]  # rejected sees the prompt, not the chosen tokens
    assert mask[3, :4].tolist() == [True, True, True, True]
    assert mask.any(dim=1).all()  # no empty row (padding sees the prompt)
    additive = prefix_sharing_mask(segments, "eager", torch.float32)[0, 0]
    assert (additive == 0).equal(mask)


def test_image_contrast_pairs_and_flash_attention_fall_back_to_the_2b_rows(setup):
    recipe, processor, planned, batches = setup
    rows = [RenderedDataset(planned, processor)[i] for i in range(2)]
    contrast = replace(rows[0]["pair"], has_rejected_images=True)
    batch = DPOCollator(pad_token_id=processor.tokenizer.pad_token_id)(
        [
            {
                **rows[0],
                "pair": contrast,
                "rejected_pixel_values": rows[0]["pixel_values"],
                "rejected_image_sizes": rows[0]["image_sizes"],
            },
            rows[1],
        ]
    )
    assert "shared_input_ids" not in batch
    model = policy(recipe)
    assert shares_prompt(model, batches[0])
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    assert not shares_prompt(model, batches[0])
    with pytest.raises(ValueError, match="empty prompt"):
        shared_layout([replace(rows[0]["pair"], prompt_ids=[])], 0)


def test_step_zero_loss_is_log_2_on_the_shared_layout(setup):
    recipe, _, _, batches = setup
    model, _ = common.build_tiny(recipe.model, seed=0)
    peft_model = configure_trainable(model, dpo_parts(recipe.model), recipe.lora)
    batch = batches[0]
    assert shares_prompt(peft_model, batch)
    loss, metrics = DPOLoss(recipe, Accelerator(cpu=True), share_features=True)(peft_model, batch)
    pairs = batch["input_ids"].shape[0] // 2
    assert loss.item() / pairs == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)


def test_pair_logps_dispatches_to_the_shared_layout(setup):
    recipe, _, _, batches = setup
    model = policy(recipe)
    calls = []
    hook = (
        model.get_base_model()
        .model.layers[0]
        .input_layernorm.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[:-1].numel()))
    )
    batch = batches[0]
    with torch.no_grad():
        pair_logps(model, batch, DPOLoss.image_kwargs_for(model, batch, share_features=True)[0])
    hook.remove()
    # The B shared rows' real tokens (the real-token path), not the 2B rows.
    assert calls == [int((batch["shared_segments"] != SEGMENT_PAD).sum())]


def test_sft_logits_only_at_supervised_pairs(tiny_model, tiny_processor):
    """sft_loss_sum computes logits at the supervised (row, position) pairs only, and the same loss as the full
    cross-entropy."""
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 7, -100, -100, 8, 9]])
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]),
        "labels": labels,
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    loss, _ = sft_loss_sum(tiny_model, batch)
    hook.remove()
    assert seen == [torch.Size([5, tiny_model.config.hidden_size])]  # 5 supervised tokens, not B x |union|
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
    )
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_text_only_batch_skips_the_vision_tower_in_one_process(tiny_model):
    calls = []
    hook = tiny_model.model.vision_embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    tiny_model.train()
    try:
        tiny_model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        tiny_model.eval()
        hook.remove()
    assert calls == []


def test_dpo_runs_give_the_same_losses_with_and_without_prompt_sharing(tmp_path):
    write_synthetic(tmp_path / "synthetic", seed=0, **DEMO_COUNTS)
    histories = {}
    for share in (True, False):
        overrides = small_overrides(tmp_path / f"share_{share}", tmp_path / "synthetic", "dpo", max_steps=3)
        histories[share] = history(
            run_stage("dpo", overrides + [f"dpo.share_prompt={str(share).lower()}"]), "dpo"
        )
    on, off = histories[True], histories[False]
    assert [h["step"] for h in on] == [h["step"] for h in off] == [1, 2, 3]
    assert on[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_length_grouping_sorts_pairs_by_their_shared_row(setup):
    """`PlannedSample.shared_tokens` is the length of the pair's prefix-sharing row (what the LM computes), and
    `data.group_by_length` batches DPO pairs of similar shared length."""
    recipe, processor, planned, _ = setup
    for index, plan_ in enumerate(planned):
        batch = DPOCollator(pad_token_id=processor.tokenizer.pad_token_id)(
            [RenderedDataset(planned, processor)[index]]
        )
        assert plan_.shared_tokens == int(
            (batch["shared_input_ids"] != processor.tokenizer.pad_token_id).sum()
        )
    grouped = replace(recipe.data, group_by_length=True)
    make_loader, _ = loader_factory(
        planned, processor, grouped, stage="dpo", micro_batch_size=4, seed=0, num_replicas=1, rank=0
    )
    spans = []
    for batch in make_loader(0):
        lengths = sorted(planned[i].shared_tokens for i in batch["indices"].tolist())
        spans.append(lengths[-1] - lengths[0])
    everything = sorted(p.shared_tokens for p in planned)
    assert max(spans) < everything[-1] - everything[0]
