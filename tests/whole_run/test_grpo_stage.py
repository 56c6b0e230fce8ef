"""The GRPO stage on the tiny model: rollouts (the prompt's KV cache shared by its G completions, one vision pass per
prompt group, per-completion seeds), the loss pass reusing the rollout's image features, and the real entry point:
a short run, its metrics, and stop + resume ending where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from config import load_recipe
from data.loaders import load_samples, plan
from data.sources import SkipCounter
from eval.curves import curves_section
from rundir.layout import start_file
from train import grpo
from train.core import model_loading as common
from train.core.callbacks import Preempted
from train.core.trainable import configure_trainable, dpo_parts
from train.rl.rollout import TorchRollout
from train.rl.step import completion_seeds, completion_token_logps, prompt_example, rollout_batch

from ..run_helpers import REPO, adapter, assert_same_adapter, history

DEMO_GRPO = REPO / "recipes" / "demo_grpo.yaml"
G = 4


@pytest.fixture(scope="module")
def setup(synthetic):
    recipe = load_recipe(DEMO_GRPO, [f"data.train.0.path={synthetic}", "data.train.0.limit=16"])
    model, processor = common.build_tiny(recipe.model, seed=0)
    skips = SkipCounter()
    samples = load_samples(
        recipe.data.train,
        "sft",
        recipe.data,
        seed=0,
        skips=skips,
        main_first=Accelerator(cpu=True).main_process_first,
    )
    planned = plan(samples, processor, recipe.data, skips)
    examples = [prompt_example(p.sample, i) for i, p in enumerate(planned)]
    with_images = [e for e in examples if e.images][:3]
    model = configure_trainable(model, dpo_parts(recipe.model), recipe.lora)
    model.eval()
    return model, processor, with_images


def engine(processor, **kwargs):
    return TorchRollout(processor, **{"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, **kwargs})


def test_a_group_shares_its_prompt_pass_and_samples_what_separate_rows_would(setup):
    model, processor, examples = setup
    seeds = completion_seeds(0, 0, range(len(examples)), G)
    calls = [0]
    model.get_base_model().model.vision_embed_tokens.img_processor.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    shared = engine(processor).sample(model, examples, num_generations=G, seeds=seeds)
    assert calls[0] == 1  # one vision pass for the whole micro-batch of prompts
    assert shared.prompt_ids.shape[0] == len(examples) and shared.completion_ids.shape[0] == G * len(examples)
    # The same completions when every completion gets its own copy of the prompt (no shared cache).
    repeated = [e for e in examples for _ in range(G)]
    alone = engine(processor).sample(
        model, repeated, num_generations=2, seeds=[s for s in seeds for _ in range(2)]
    )
    assert alone.completion_ids[::2].tolist() == shared.completion_ids.tolist()
    assert alone.texts[::2] == shared.texts
    # A completion depends on its seed only: sampled again, the same tokens.
    again = engine(processor).sample(model, examples, num_generations=G, seeds=seeds)
    assert again.completion_ids.tolist() == shared.completion_ids.tolist()
    # Without kept features (FSDP, a tower with LoRA) the prefill's forward encodes the images: the same tokens.
    calls[0] = 0
    inside = engine(processor, share_features=False).sample(model, examples, num_generations=G, seeds=seeds)
    assert calls[0] == 1 and inside.image_features is None
    assert inside.completion_ids.tolist() == shared.completion_ids.tolist()


def test_stop_strings_and_top_p(setup):
    model, processor, examples = setup
    seeds = completion_seeds(0, 1, range(len(examples)), G)
    free = engine(processor).sample(model, examples, num_generations=G, seeds=seeds)
    import re

    stop = next(m.group(0) for t in free.texts for m in [re.search(r"[a-z]{2}", t)] if m)
    stopped = engine(processor, stop_strings=(stop,)).sample(model, examples, num_generations=G, seeds=seeds)
    tokenizer = processor.tokenizer
    hits = 0
    for row in range(len(stopped.texts)):
        ids = stopped.completion_ids[row][stopped.completion_mask[row].bool()].tolist()
        free_ids = free.completion_ids[row][free.completion_mask[row].bool()].tolist()
        assert ids == free_ids[: len(ids)]  # the same draws, cut earlier or not at all
        if stop in tokenizer.decode(ids):
            hits += 1  # it ends at the token completing the stop string
            assert stop not in tokenizer.decode(ids[:-1]) and stop in stopped.texts[row]
        else:
            assert ids == free_ids
    assert hits >= 1
    greedy = engine(processor, top_p=1e-6).sample(model, examples, num_generations=G, seeds=seeds)
    for b in range(len(examples)):  # top-p this small keeps the most likely token only: a group is identical
        assert len(set(greedy.texts[b * G : (b + 1) * G])) == 1


def test_the_loss_pass_reuses_the_rollout_features_and_scores_what_pixels_would(setup):
    model, processor, examples = setup
    completions = engine(processor).sample(
        model, examples, num_generations=G, seeds=completion_seeds(0, 2, range(len(examples)), G)
    )
    batch = rollout_batch(completions, processor.tokenizer.pad_token_id)
    rows_only = {k: v for k, v in batch.items() if not k.startswith("shared_")}
    calls = [0]
    handle = model.get_base_model().model.vision_embed_tokens.img_processor.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    shared, _ = completion_token_logps(model, batch, 1.0)
    assert calls[0] == 0  # no vision pass: the rollout's features serve every completion
    in_rows, _ = completion_token_logps(model, rows_only, 1.0)
    from_pixels, _ = completion_token_logps(
        model, {k: v for k, v in rows_only.items() if k != "image_features"}, 1.0
    )
    assert calls[0] == 1  # one pass for the micro-batch's prompts, shared over their G rows
    handle.remove()
    # The prefix-sharing layout (each prompt once for its G completions) gives the G-row layout's log-probs.
    assert batch["shared_input_ids"].shape[0] == len(examples)
    assert batch["shared_input_ids"].numel() < batch["input_ids"].numel()
    torch.testing.assert_close(shared, in_rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_rows, from_pixels, atol=1e-5, rtol=0)
    assert (shared[batch["completion_mask"] == 0] == 0).all() and (
        shared[batch["completion_mask"] == 1] < 0
    ).all()
    # ... and the same gradients.
    grads = []
    for layout in (batch, rows_only):
        model.zero_grad()
        completion_token_logps(model, layout, 1.0)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4)


def overrides(run_dir, synthetic, **grpo_keys):
    settings = {"max_steps": 4, "num_generations": 4, "max_new_tokens": 4, **grpo_keys}
    return [
        f"output_dir={run_dir}",
        f"data.train.0.path={synthetic}",
        "data.train.0.limit=64",
        "stages=[grpo]",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "grpo.rewards=[{type: exact_match}, {type: length, weight: 0.5}]",
        *(f"grpo.{key}={value}" for key, value in settings.items()),
    ]


def test_a_short_run_logs_the_rewards_and_the_loss_terms(synthetic, tmp_path):
    run = grpo.main(
        load_recipe(
            DEMO_GRPO, overrides(tmp_path / "run", synthetic, beta=0.04, num_iterations=2, loss_type="grpo")
        ),
        DEMO_GRPO,
    )
    steps = history(run, "grpo")
    assert [h["step"] for h in steps] == [1, 2, 3, 4]
    for key in (
        "rewards/exact_match/mean",
        "rewards/length/std",
        "kl",
        "clip_ratio/region_mean",
        "entropy",
        "completions/mean_length",
        "reward",
        "frac_reward_zero_std",
    ):
        assert all(key in h for h in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the fresh adapter is the reference at step 1
    assert steps[0]["clip_ratio/region_mean"] == 0.0  # first pass of a generation: ratio 1
    assert steps[0]["samples"] == 4 * 2 * 4  # prompts x micro-batches x completions
    # num_iterations=2: the second step replays the first's completions (same rewards), against old log-probs.
    assert steps[1]["reward"] == steps[0]["reward"] and steps[1]["loss"] != steps[0]["loss"]
    assert (run / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert start_file(run, "grpo").is_file()
    # The report's GRPO block: its curves and the last generation's groups with their completions and rewards.
    page = curves_section(run)
    assert 'data-stage="grpo" data-metric="reward"' in page and 'data-metric="kl"' in page
    assert '<table class="samples">' in page


def test_stop_and_resume_ends_with_the_same_adapter(synthetic, tmp_path):
    straight = grpo.main(load_recipe(DEMO_GRPO, overrides(tmp_path / "straight", synthetic)), DEMO_GRPO)
    interrupted = overrides(tmp_path / "resumed", synthetic)
    with pytest.raises(Preempted):
        grpo.main(load_recipe(DEMO_GRPO, interrupted), DEMO_GRPO, stop_after_step=2)
    grpo.main(load_recipe(DEMO_GRPO, [*interrupted, "train.resume=true"]), DEMO_GRPO)
    resumed = tmp_path / "resumed"
    assert [h["reward"] for h in history(straight, "grpo")] == [h["reward"] for h in history(resumed, "grpo")]
    assert_same_adapter(adapter(straight, "grpo"), adapter(resumed, "grpo"), rel=1e-6)
