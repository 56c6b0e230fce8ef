"""benchmarks/train_step.py: its FLOP model against torch.utils.flop_counter.FlopCounterMode on a small model with
the real module layout, the real geometry's parameter count, and (slow) one full-size LoRA step on CPU in 24 GB."""

import importlib.util
import resource
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from config.schema import LoraSection, ModelSection
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor
from models.phi3v.sizes import PARAMETERS, full_size_config
from tests.conftest import REPO
from train.core.losses import sft_loss_sum
from train.core.trainable import configure_trainable

spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
train_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_step)

HALF_HEAD = 8  # 64 / 4 heads / 2


def small():
    config = full_size_config(
        "phi3v",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        pad_token_id=0,
        image_token_id=500,
        rope_scaling={"type": "su", "short_factor": [1.0] * HALF_HEAD, "long_factor": [1.0] * HALF_HEAD},
        img_processor={
            "image_dim_out": 32,
            "num_img_tokens": 4,
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            },
        },
    )
    # eager: on CPU, SDPA dispatches to _scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode (torch
    # 2.13) has no formula for and counts as 0; eager's two matmuls per head are the same 4 T^2 d the formula counts.
    config._attn_implementation = "eager"
    return config


def small_batch(config, rows=2):
    processor = Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8)
    samples = [
        train_step.make_sample(processor, i, 1, 20 + 7 * i, 5, 0, image_token=500, vocab=400)
        for i in range(rows)
    ]
    return train_step.sft_batch(samples, packing=False, pad=0)


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_the_full_geometry_has_the_hub_parameter_count():
    with torch.device("meta"):
        for name in ("phi3v", "phi35v"):
            assert sum(p.numel() for p in Phi3VForCausalLM(full_size_config(name)).parameters()) == PARAMETERS


def test_forward_flops_match_flop_counter_mode():
    """Exact: the formula counts the same operations FlopCounterMode does (matmuls, the patch convolution, attention
    over the full square); neither counts norms, activations or softmax."""
    torch.manual_seed(0)
    config = small()
    model = Phi3VForCausalLM(config).eval()
    batch = small_batch(config)
    counts = train_step.batch_counts(batch, crop=32, patch=8)
    expected = train_step.step_flops(config, counts, "sft")
    inputs = {k: v for k, v in batch.items() if k != "_rows"}
    with torch.no_grad():
        got = counted(lambda: sft_loss_sum(model, inputs))
    assert got == expected["lm_forward"] + expected["clip_forward"] + expected["projector_forward"]


def test_training_flops_match_flop_counter_mode_within_the_stated_difference():
    """A full fine-tune of the LM and projector (tower frozen, no checkpointing): FlopCounterMode's forward + backward
    equals the model count 3 x (LM + projector) + CLIP exactly. (The projector's input needs a gradient too: the
    trained separators sub_GN / glb_GN are concatenated with the frozen tower's features before it.)"""
    torch.manual_seed(0)
    config = small()
    model = configure_trainable(
        Phi3VForCausalLM(config),
        ModelSection(
            name_or_path="tiny",
            language="full",
            vision="frozen",
            projector="full",
            gradient_checkpointing=False,
        ),
        LoraSection(),
    )
    model.train()
    batch = small_batch(config)
    counts = train_step.batch_counts(batch, crop=32, patch=8)
    inputs = {k: v for k, v in batch.items() if k != "_rows"}
    got = counted(lambda: sft_loss_sum(model, inputs)[0].backward())
    assert got == train_step.step_flops(config, counts, "sft")["train"]


def test_lora_executes_less_than_the_model_count():
    """LoRA (frozen base, no checkpointing): the frozen weights get no weight gradient, so the executed FLOPs are
    the model count minus ~2 P T, plus LoRA's own small matmuls; stated, not hidden, in the MFU column's meaning."""
    torch.manual_seed(0)
    config = small()
    model = configure_trainable(
        Phi3VForCausalLM(config),
        ModelSection(
            name_or_path="tiny",
            language="lora",
            vision="frozen",
            projector="full",
            gradient_checkpointing=False,
        ),
        LoraSection(r=8),
    )
    model.train()
    batch = small_batch(config)
    counts = train_step.batch_counts(batch, crop=32, patch=8)
    inputs = {k: v for k, v in batch.items() if k != "_rows"}
    got = counted(lambda: sft_loss_sum(model, inputs)[0].backward())
    model_count = train_step.step_flops(config, counts, "sft")["train"]
    d, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    no_weight_grads = 2 * (4 * d * d + 3 * d * i) * L * counts["tokens"]
    assert 0.9 < got / (model_count - no_weight_grads) < 1.2


@pytest.mark.slow
def test_one_full_size_lora_step_on_cpu_fits_in_24_gb():
    """One bf16 LoRA SFT step of the full Phi-3-V (gradient checkpointing, one ChartQA-sized image at num_crops 1,
    64 text tokens: the script's CPU defaults) in its own process; its peak RSS must stay under 24 GB."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_step.py"),
            "--size",
            "full",
            "--device",
            "cpu",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kb < 24 * 2**20, f"peak RSS {peak_kb / 2**20:.1f} GB"
    assert "sft " in done.stdout
