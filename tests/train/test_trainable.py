"""What trains, and the held-out preference eval on small data."""

import json

import pytest

from config import LoraSection, ModelSection
from data.synthetic import DEMO_COUNTS, write_synthetic
from train.core.model_loading import build_tiny
from train.core.trainable import PROJECTOR, VISION, configure_trainable, part_of, trainable_counts

from ..run_helpers import run_stage, small_overrides


@pytest.mark.parametrize("language", ["lora", "full"])
def test_a_vision_tower_trained_in_full_leaves_the_layers_that_never_run_frozen(language):
    """Features come from CLIP layer -2: the last layer and post_layernorm are in the checkpoint but never computed,
    so they must not train (no gradient would reach them, and DDP stops on unused parameters)."""
    section = ModelSection(
        name_or_path="tiny",
        vision="full",
        projector="full",
        language=language,
        num_crops=4,
        gradient_checkpointing=False,
    )
    model, _ = build_tiny(section, seed=0)
    tower = model.model.vision_embed_tokens.img_processor.vision_model
    layers_run, layers = tower.num_layers_run, len(tower.encoder.layers)
    assert layers_run < layers
    model = configure_trainable(model, section, LoraSection())
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    for index in range(layers):
        in_layer = {name for name in trainable if f"vision_model.encoder.layers.{index}." in name}
        assert bool(in_layer) == (index < layers_run), (index, layers_run)
    assert not any("post_layernorm" in name for name in trainable)


def test_the_report_counts_a_part_trained_in_full_beside_lora_once():
    """PEFT keeps the frozen original of a `modules_to_save` part and its trained copy: the part's total is its own
    size (the denominator of `trainable X of total`), not twice."""
    section = ModelSection(
        name_or_path="tiny",
        vision="lora",
        projector="full",
        language="lora",
        num_crops=4,
        gradient_checkpointing=False,
    )
    model, _ = build_tiny(section, seed=0)
    sizes = {
        part: sum(p.numel() for n, p in model.named_parameters() if part_of(n) == part)
        for part in (PROJECTOR, VISION)
    }
    counts = trainable_counts(configure_trainable(model, section, LoraSection()))
    assert (
        counts[PROJECTOR]["total"] == sizes[PROJECTOR]
        and 0 < counts[PROJECTOR]["trainable"] <= sizes[PROJECTOR]
    )
    assert sizes[VISION] < counts[VISION]["total"] < 1.5 * sizes[VISION]  # plus its LoRA, not twice


def test_held_out_preference_eval_with_fewer_pairs_than_a_batch(tmp_path):
    """eval.batch_size (32 in the demo) above the held-out pairs (3): every pair is scored, not none."""
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **DEMO_COUNTS)
    run = run_stage(
        "dpo", [*small_overrides(tmp_path / "run", synthetic, "dpo", max_steps=1), "data.eval.0.limit=3"]
    )
    held_out = json.loads((run / "dpo" / "preference_eval.json").read_text())
    assert held_out["dpo"]["pairs"] == held_out["sft"]["pairs"] == 3
