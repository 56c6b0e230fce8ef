"""FSDP2 (accelerate's `fsdp_version: 2`, recipes/accelerate/fsdp2.yaml) in 2 CPU processes over gloo against 1 process
with twice the accumulation: SFT with LoRA and in full, DPO with LoRA, the end-of-stage eval hook through the sharded
model, sharded checkpoints with a stop and an exact resume (docs/distributed.md#fsdp2).

Each 2-process run feeds several tests (module-scoped fixtures): about 25-40 s each on 2 cores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest
from safetensors.torch import load_file

from rundir.layout import checkpoints_dir, diagnostics_file
from train.core.validation_loss import filler_batches

from ..run_helpers import (
    REPO,
    adapter,
    assert_same_adapter,
    assert_same_steps,
    history,
    launch_two_processes,
    run_stage,
    small_overrides,
    text_and_image_rows,
    two_process_command,
    wait_for_file,
)

TIMEOUT = 420  # a hung collective fails the test instead of the session
SFT = dict(micro_batch_size=2, max_steps=8, checkpoint_every=2)  # 1 process: grad_accum 4; 2 processes: 2
EVAL = ["stages=[sft,eval]", "eval.limit=8", "eval.when=[base,sft]"]


def pair(stage: str, synthetic, tmp_path_factory, name: str, extra: list[str] = (), **settings):
    """(1-process run dir, 2-process FSDP2 run dir, the launch's result) of the same stage."""
    root = tmp_path_factory.mktemp(name)
    one = run_stage(
        stage, [*small_overrides(root / "one", synthetic, stage, grad_accum=4, **settings), *extra]
    )
    result = launch_two_processes(
        stage,
        [*small_overrides(root / "two", synthetic, stage, grad_accum=2, **settings), *extra],
        fsdp=True,
        timeout=TIMEOUT,
    )
    return one, root / "two", result


@pytest.fixture(scope="module")
def sft_lora(synthetic, tmp_path_factory):
    return pair("sft", synthetic, tmp_path_factory, "sft_lora", EVAL, **SFT)


@pytest.fixture(scope="module")
def sft_full(synthetic, tmp_path_factory):
    return pair(
        "sft",
        synthetic,
        tmp_path_factory,
        "sft_full",
        ["model.language=full", "export.adapter=false"],
        max_steps=3,
        micro_batch_size=2,
    )


@pytest.fixture(scope="module")
def dpo_lora(synthetic, tmp_path_factory):
    return pair("dpo", synthetic, tmp_path_factory, "dpo_lora", max_steps=3, micro_batch_size=2)


def test_validation_fillers_even_out_the_forwards_of_every_rank():
    # 5 batches over 2 ranks: rank 0 runs 3, rank 1 runs 2 and one filler; 1 batch over 4 ranks: 0 then 1 each.
    assert [filler_batches(9, 2, 2, r) for r in range(2)] == [0, 1]
    assert [filler_batches(8, 2, 2, r) for r in range(2)] == [0, 0]
    assert [filler_batches(1, 4, 4, r) for r in range(4)] == [0, 1, 1, 1]


@pytest.mark.slow  # launches 2 processes
def test_fsdp2_sft_lora_equals_one_process_with_twice_the_accumulation(sft_lora):
    one, two, result = sft_lora
    # The wrap units: each decoder and CLIP encoder layer, then accelerate's embedding, tail and root units.
    units = re.search(r"FSDP2 units: (.*)", result.stderr).group(1)
    assert "2 Phi3DecoderLayer" in units and "CLIPEncoderLayer" in units, units
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-4)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-3)  # seen: 7e-6; steps: 6e-7
    # The adapter is in PEFT layout, as any other run's (keys of peft 0.11, the portable form).
    config = json.loads((two / "sft" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # The validation loss (data.eval) ran through the sharded model on both ranks and agrees.
    val_one, val_two = (
        json.loads((run / "sft" / "summary.json").read_text())["validation"] for run in (one, two)
    )
    assert [v["step"] for v in val_one] == [v["step"] for v in val_two] == [8]
    assert val_one[0]["loss"] == pytest.approx(val_two[0]["loss"], rel=1e-4)


@pytest.mark.slow  # launches 2 processes
def test_fsdp2_eval_hook_scores_as_one_process(sft_lora):
    one, two, _ = sft_lora
    results = [json.loads((run / "eval" / "results.json").read_text()) for run in (one, two)]
    assert results[0] == results[1] and set(results[1]["synthetic"]["exact_match"]) == {"base", "sft"}
    # Greedy generation through the sharded model: the very same answers, row by row.
    for stage in ("base", "sft"):
        files = sorted((one / "eval" / "predictions" / stage).iterdir())
        assert files
        for file in files:
            assert file.read_text() == (two / "eval" / "predictions" / stage / file.name).read_text(), file


@pytest.mark.slow  # launches 2 processes, stops one and resumes it
def test_fsdp2_stop_and_resume_ends_with_the_uninterrupted_adapter(sft_lora, synthetic, tmp_path):
    _, straight, _ = sft_lora
    run = tmp_path / "resumed"
    overrides = [*small_overrides(run, synthetic, "sft", grad_accum=2, **SFT), *EVAL]
    command, env = two_process_command("sft", overrides, fsdp=True, port_offset=1)
    log = tmp_path / "interrupted.log"
    with log.open("w") as stream:
        job = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_file(job, checkpoints_dir(run, "sft") / "step-00000002" / "loop_state.json", log, TIMEOUT)
        # What a preemption does: SIGTERM; the ranks agree on the step to stop after and write its checkpoint.
        rank1 = int(re.search(r"# rank 1 of 2, pid (\d+)", diagnostics_file(run, 1).read_text()).group(1))
        os.kill(rank1, signal.SIGTERM)
        job.wait(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d) of 8", output)
    assert job.returncode != 0 and stopped, output[-6000:]
    step = int(stopped.group(1))
    # Signalled once step 2's checkpoint is complete: the ranks stop at a later step boundary, before the last.
    assert 2 <= step < 8 and not (run / "sft" / "adapter").exists()
    # Sharded: each rank wrote its share of the model and optimizer (accelerate's FSDP format) beside the lean files.
    sharded = checkpoints_dir(run, "sft") / f"step-{step:08d}" / "deepspeed"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (sharded / folder).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}, (
            folder
        )

    result = launch_two_processes("sft", [*overrides, "train.resume=true"], fsdp=True, timeout=TIMEOUT)
    assert f"resumed from {checkpoints_dir(run, 'sft') / f'step-{step:08d}'}" in result.stderr
    assert_same_adapter(adapter(straight, "sft"), adapter(run, "sft"), rel=1e-6)  # seen: 0 (bitwise equal)
    assert [h["step"] for h in history(run, "sft")] == list(range(1, 9))
    for x, y in zip(history(straight, "sft"), history(run, "sft")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (x, y)


@pytest.mark.slow  # launches 2 processes
def test_fsdp2_full_fine_tuning_equals_one_process(sft_full):
    one, two, _ = sft_full
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-4)
    merged = [load_file(run / "sft" / "merged" / "model.safetensors") for run in (one, two)]
    base = load_file(one / "base" / "model.safetensors")
    assert merged[1].keys() == base.keys()  # the whole model, in the hub layout, gathered on rank 0
    assert any(not (merged[1][k] == base[k]).all() for k in base if "layers" in k)  # the decoder trained
    assert_same_adapter(merged[0], merged[1], rel=1e-3)  # seen: 3e-6; steps: 6e-7
    assert json.loads((two / "sft" / "merged" / "config.json").read_text())["model_type"] == "phi3_v"


@pytest.mark.slow  # launches 2 processes
def test_fsdp2_dpo_lora_equals_one_process(dpo_lora):
    one, two, _ = dpo_lora
    assert_same_steps(history(one, "dpo"), history(two, "dpo"), rtol=1e-4)
    assert_same_adapter(adapter(one, "dpo"), adapter(two, "dpo"), rel=1e-3)  # seen: 5e-6; steps: 5e-7
    # The held-out preference eval (policy and reference, the adapter disabled) through the sharded model.
    held_out = [json.loads((run / "dpo" / "preference_eval.json").read_text()) for run in (one, two)]
    for policy in ("dpo", "sft"):
        assert held_out[0][policy]["pairs"] == held_out[1][policy]["pairs"]
        assert held_out[0][policy]["accuracy"] == held_out[1][policy]["accuracy"]
        assert held_out[0][policy]["mean_margin"] == pytest.approx(
            held_out[1][policy]["mean_margin"], rel=1e-4
        )


@pytest.mark.slow  # launches 2 processes
def test_a_text_only_rank_beside_an_image_rank_does_not_hang(synthetic, tmp_path):
    """One rank's batch is text-only at every step, the other's has an image: the text-only rank runs the vision
    path on a blank crop, so both gather the same FSDP units."""
    overrides = [
        *small_overrides(tmp_path / "run", synthetic, "sft", micro_batch_size=1, grad_accum=1, max_steps=3),
        *text_and_image_rows(synthetic, tmp_path / "mixed"),
        "train.collective_timeout_s=60",
    ]
    launch_two_processes("sft", overrides, fsdp=True, timeout=300)
    assert [h["step"] for h in history(tmp_path / "run", "sft")] == [1, 2, 3]
