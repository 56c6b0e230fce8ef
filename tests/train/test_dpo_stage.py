"""DPO's batch path on the tiny model: one vision pass per pair, log 2 and zero margins at step 0."""

import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator

from config import load_recipe
from data.loaders import load_samples, loader_factory, plan
from data.sources import SkipCounter
from data.synthetic import write_synthetic
from train.core import model_loading as common
from train.core.trainable import configure_trainable, dpo_parts
from train.dpo import chosen_trend, warn_if_chosen_falls
from train.preference.stage_loss import DPOLoss

from ..run_helpers import DEMO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_synthetic(root, seed=0, n_train=8, n_eval=4, n_pref_train=16, n_pref_eval=4)
    recipe = load_recipe(
        DEMO, [f"data.train.0.path={root}", f"data.eval.0.path={root}", f"output_dir={root}/run"]
    )
    model, processor = common.build_tiny(recipe.model, seed=0)
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
        planned, processor, recipe.data, stage="dpo", micro_batch_size=4, seed=0, num_replicas=1, rank=0
    )
    batch = next(b for b in make_loader(0) if "pixel_values" in b)
    return recipe, model, batch


def counted_vision_calls(model) -> list[int]:
    calls = [0]
    tower = model.model.vision_embed_tokens.img_processor
    tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("vision, expected_calls", [("frozen", 1), ("lora", 2)])
def test_vision_tower_runs_once_per_batch_of_pairs(setup, vision, expected_calls):
    recipe, base, batch = setup
    model, _ = common.build_tiny(recipe.model, seed=0)
    calls = counted_vision_calls(model)
    parts = dpo_parts(replace(recipe.model, vision=vision))
    peft_model = configure_trainable(model, parts, recipe.lora)
    loss_fn = DPOLoss(recipe, Accelerator(cpu=True), share_features=parts.vision != "lora")
    loss, _ = loss_fn(peft_model, batch)
    loss.backward()
    pairs = batch["input_ids"].shape[0] // 2
    assert (
        len(batch["image_sizes"]) < 2 * pairs
    )  # each image is carried once for its chosen and rejected rows
    # Frozen tower: one pass serves chosen, rejected, policy and reference. LoRA in the tower: the reference
    # (adapters off) needs its own pass; chosen and rejected still share each.
    assert calls[0] == expected_calls


def test_step_zero_loss_is_log_2_and_margins_are_zero(setup):
    recipe, _, batch = setup
    recipe = replace(
        recipe, dpo=replace(recipe.dpo, sft_weight=0.0)
    )  # the sigmoid loss alone (the demo adds RPO's)
    model, _ = common.build_tiny(recipe.model, seed=0)
    peft_model = configure_trainable(model, dpo_parts(recipe.model), recipe.lora)
    loss, metrics = DPOLoss(recipe, Accelerator(cpu=True), share_features=True)(peft_model, batch)
    pairs = batch["input_ids"].shape[0] // 2
    assert loss.item() / pairs == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_only_the_fresh_adapter(setup):
    recipe, _, batch = setup
    model, _ = common.build_tiny(recipe.model, seed=0)
    peft_model = configure_trainable(model, dpo_parts(recipe.model), recipe.lora)
    loss, _ = DPOLoss(recipe, Accelerator(cpu=True), share_features=True)(peft_model, batch)
    loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_B" in n for n in trained)
    assert all(torch.isfinite(p.grad).all() for p in peft_model.parameters() if p.grad is not None)


def test_a_falling_chosen_log_prob_under_a_growing_margin_is_warned_about(caplog):
    """What the demo showed before its data carried a systematic error: the margin grows while the chosen answers
    become less likely, and the task score falls; the stage says so and names the RPO term."""
    history = [
        {"step": 50, "logps/chosen": -1.0, "rewards/margins": 0.2},
        {"step": 100, "logps/chosen": -1.2, "rewards/margins": 0.5},
        {"step": 150, "logps/chosen": -1.5, "rewards/margins": 0.9},
    ]
    assert chosen_trend(history) == pytest.approx((-0.5, 0.7))  # the first third against the last
    with caplog.at_level("WARNING", logger="train.dpo"):
        warn_if_chosen_falls(history)
    assert "chosen answers' log-prob fell by 0.500" in caplog.text and "dpo.sft_weight" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="train.dpo"):
        warn_if_chosen_falls(
            [{**h, "logps/chosen": -h["logps/chosen"]} for h in history]
        )  # chosen rises: fine
        warn_if_chosen_falls(history[:1])  # one logged step: no trend
        warn_if_chosen_falls(
            [{**h, "logps/chosen": h["logps/chosen"] / 10} for h in history]
        )  # 0.05 nats: noise
    assert caplog.text == ""
