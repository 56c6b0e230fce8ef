"""The memory planner (train/tools/memory_plan.py): parameter counts of the real model built on the meta device, model-state
bytes equal to DeepSpeed's own estimator, plans for the ChartQA LoRA recipe and a full fine-tune on 8 x 80 GB, and
the activation estimate against the measured peak RSS of the tiny model on CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from config import load_recipe
from train.tools import memory_plan as memory

from ..conftest import REPO

CHARTQA = REPO / "recipes" / "chartqa.yaml"
FULL = ["model.language=full", "model.vision=full", "model.projector=full", "export.adapter=false"]
DECODER_LAYER = 9216 * 3072 + 3072 * 3072 + 16384 * 3072 + 3072 * 8192 + 2 * 3072


@pytest.fixture(scope="module")
def full_counts():
    recipe = load_recipe(CHARTQA, FULL)
    return memory.count(memory.build_model(recipe), recipe)


@pytest.fixture(scope="module")
def lora_counts():
    recipe = load_recipe(CHARTQA)
    return memory.count(memory.build_model(recipe), recipe)


def test_the_meta_model_has_the_hub_checkpoints_parameters(full_counts):
    assert full_counts.total == 4_146_621_440  # docs/phi3v.md: 2 bytes x this = the index's total_size
    assert full_counts.largest_layer == 32064 * 3072  # embed_tokens / lm_head
    assert full_counts.largest_unit == DECODER_LAYER
    # Everything trains but CLIP's post_layernorm and its last layer, which never run (docs/phi3v.md).
    assert 0 < full_counts.total - full_counts.trainable < 13_000_000


def test_the_lora_recipe_trains_what_a_run_trains(lora_counts):
    # r=64 on qkv, o, gate_up, down of 32 layers, plus peft's trainable copy of the projector (modules_to_save).
    lora = 32 * 64 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    projector = (
        4096 * 3072 + 3072 + 3072 * 3072 + 3072
    )  # img_projection.0 and .2 (glb_GN / sub_GN stay frozen)
    assert lora_counts.trainable == lora + projector
    assert lora_counts.total == 4_146_621_440 + lora_counts.trainable


@pytest.mark.parametrize("gpus_per_node,nodes", [(8, 1), (8, 2)])
def test_model_states_equal_deepspeeds_estimator(full_counts, gpus_per_node, nodes):
    """DeepSpeed's estimator assumes every parameter trains, in 16-bit with fp32 masters: so does this check."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    everything = dataclasses.replace(full_counts, trainable=full_counts.total)
    gpus = gpus_per_node * nodes
    ours = {s: sum(memory.model_states(everything, s, gpus, w=2).values()) for s in ("zero2", "zero3")}
    _, zero2 = estimate_zero2_model_states_mem_needs(
        everything.total, gpus_per_node, nodes, cpu_offload=False
    )
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        everything.total,
        everything.largest_layer,
        gpus_per_node,
        nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    assert ours["zero2"] == pytest.approx(zero2, rel=1e-9)
    assert ours["zero3"] == pytest.approx(zero3, rel=1e-9)

    def printed_gpu_gb(estimate, *args) -> float:  # the "per GPU" of the no-offload row of DeepSpeed's table
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            estimate(*args, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
        row = next(line for line in out.getvalue().splitlines() if "offload_optimizer=none" in line)
        return float(re.findall(r"([\d.]+)GB", row)[1])

    assert ours["zero2"] / 2**30 == pytest.approx(
        printed_gpu_gb(estimate_zero2_model_states_mem_needs_all_cold, everything.total), abs=0.006
    )
    assert ours["zero3"] / 2**30 == pytest.approx(
        printed_gpu_gb(
            estimate_zero3_model_states_mem_needs_all_cold, everything.total, everything.largest_layer
        ),
        abs=0.006,
    )


def test_lora_fits_everywhere_with_checkpointing_and_a_full_fine_tune_needs_sharding(
    lora_counts, full_counts
):
    _, lora = memory.plan(load_recipe(CHARTQA), gpus=8, gpu_memory_gb=80, counts=lora_counts)
    assert all(row["fits_ckpt"] for row in lora.values())
    assert not any(
        row["fits_no_ckpt"] for row in lora.values()
    )  # 4 x 4096 tokens without checkpointing: ~100 GiB
    _, full = memory.plan(load_recipe(CHARTQA, FULL), gpus=8, gpu_memory_gb=80, counts=full_counts)
    assert not full["ddp"]["fits_ckpt"] and full["zero3"]["fits_ckpt"] and full["fsdp2"]["fits_ckpt"]
    assert full["zero3"]["optimizer"] == pytest.approx(12 * full_counts.trainable / 8)


def test_the_command_line_prints_every_strategy():
    result = subprocess.run(
        [sys.executable, "-m", "train.memory", str(CHARTQA), "--gpus", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for strategy in memory.STRATEGIES:
        assert re.search(rf"^{strategy}\s+[\d.]+", result.stdout, flags=re.M), result.stdout
    assert "4,269,310,976 parameters, 122,689,536 trained" in result.stdout


# One forward + backward of the demo's tiny model (fp32, LoRA, no checkpointing) on a micro-batch of 40 x 256
# tokens with one image each, in a fresh process; the peak RSS growth is read from VmHWM after resetting it
# (/proc/self/clear_refs). MALLOC_MMAP_THRESHOLD_ keeps glibc from holding freed activation blocks in its heap,
# so RSS follows live memory, as a GPU caching allocator's "allocated" figure does.
MEASURE = textwrap.dedent("""
    import gc, json, sys, torch
    from PIL import Image
    from config import load_recipe
    from train.core.losses import sft_loss_sum
    from train.tools.memory_plan import activation_bytes, build_model, count
    from train.core.model_loading import build_tiny

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    B, S = 40, 256
    recipe = load_recipe("recipes/demo.yaml", [f"train.micro_batch_size={B}", f"data.max_length={S}"])
    model = build_model(recipe)
    _, processor = build_tiny(recipe.model, recipe.seed)
    counts = count(model, recipe)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    enc = processor(text=prompt, images=[Image.new("RGB", (64, 64), (200, 30, 30))], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    tail = torch.randint(100, 400, (B, S - n), generator=torch.Generator().manual_seed(0))
    input_ids = torch.cat([enc["input_ids"].repeat(B, 1), tail], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, S - S // 4:] = input_ids[:, S - S // 4:]  # a quarter supervised, as the estimate assumes
    pixels = enc["pixel_values"]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "pixel_values": pixels.repeat(B, *[1] * (pixels.dim() - 1)), "image_sizes": enc["image_sizes"].repeat(B, 1)}
    model.train()
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss, _ = sft_loss_sum(model, batch)
    loss.backward()
    measured = status("VmHWM") - before
    estimate = activation_bytes(counts, recipe, checkpointing=False)["total"] + 4 * counts.trainable  # + LoRA grads
    print(json.dumps({"measured": measured, "estimate": estimate}))
""")


@pytest.mark.slow  # a fresh process building the tiny model: ~20 s, a minute on a busy machine
def test_the_activation_estimate_is_within_35_percent_of_the_tiny_models_peak_rss(tmp_path):
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = figures["estimate"] / figures["measured"]
    print(
        f"tiny model: estimate {figures['estimate'] / 2**20:.0f} MiB, measured {figures['measured'] / 2**20:.0f} "
        f"MiB, ratio {ratio:.2f}"
    )
    assert 0.65 <= ratio <= 1.35, figures
