"""DeepSpeed ZeRO-3 on 2 CPU processes over gloo (docs/distributed.md#zero-3): the same losses and weights as 1
process with twice the accumulation (SFT LoRA and full, DPO LoRA), the same eval scores through the partitioned
model, exact resume from its checkpoint, and no hang when one rank's batch is text-only and the other's has images.

Tolerances: losses rtol 1e-4 and trained tensors 1e-3 in relative Frobenius norm, as for DDP and ZeRO-2
(tests/whole_run/test_train_invariants.py): the 2-rank run sums its gradients in another order (a reduce-scatter of fp32
partitions) than 1 process accumulating 4 micro-batches, and Adam's normalisation amplifies those last-bit
differences on near-zero gradients. Every launch has a timeout: a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.report import predictions_path
from rundir.layout import checkpoints_dir, eval_dir, merged_dir

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

pytestmark = pytest.mark.slow  # every test launches 2 processes

STEPS = dict(max_steps=4, checkpoint_every=2)
SCORED = ["stages=[sft,eval]", "eval.when=[sft]", "eval.limit=8", "eval.batch_size=4"]


def one_process(run: Path, synthetic: Path, stage: str, *extra: str, **train) -> Path:
    return run_stage(
        stage, [*small_overrides(run, synthetic, stage, micro_batch_size=2, grad_accum=4, **train), *extra]
    )


def zero3(run: Path, synthetic: Path, stage: str, *extra: str, **train) -> Path:
    launch_two_processes(
        stage,
        [
            *small_overrides(run, synthetic, stage, micro_batch_size=2, grad_accum=2, **train),
            *extra,
            "train.collective_timeout_s=120",
        ],
        deepspeed=True,
        zero_stage=3,
        timeout=600,
    )
    return run


@pytest.fixture(scope="module")
def scored_runs(synthetic, tmp_path_factory):
    """(1 process, 2 ZeRO-3 ranks): SFT LoRA for 4 steps with a checkpoint at 2, then the eval hook."""
    root = tmp_path_factory.mktemp("zero3_sft")
    return (
        one_process(root / "one", synthetic, "sft", *SCORED, **STEPS),
        zero3(root / "two", synthetic, "sft", *SCORED, **STEPS),
    )


def test_zero3_sft_lora_equals_one_process_with_twice_the_accumulation(scored_runs):
    one, two = scored_runs
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-4)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"))


def test_the_eval_hook_through_the_partitioned_model_scores_as_one_process(scored_runs):
    one, two = scored_runs
    results = [json.loads((eval_dir(run) / "results.json").read_text()) for run in (one, two)]
    assert results[0] == results[1] and results[0]["synthetic"]
    rows = [
        [
            json.loads(line)["prediction"]
            for line in predictions_path(run, "sft", "synthetic").read_text().splitlines()
        ]
        for run in (one, two)
    ]
    assert len(rows[0]) == 8 and rows[0] == rows[1]


def test_zero3_resumes_from_its_checkpoint_to_the_uninterrupted_weights(scored_runs, synthetic, tmp_path):
    """Killed (SIGKILL, every process) once its step-2 checkpoint is complete, then relaunched with resume."""
    _, straight = scored_runs
    run = tmp_path / "resumed"
    overrides = [
        *small_overrides(run, synthetic, "sft", micro_batch_size=2, grad_accum=2, **STEPS),
        "train.collective_timeout_s=120",
    ]
    command, env = two_process_command("sft", overrides, deepspeed=True, zero_stage=3, port_offset=7)
    log = tmp_path / "first.log"
    job = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for_file(job, checkpoints_dir(run, "sft") / "step-00000002" / "loop_state.json", log, 300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    shutil.rmtree(run / "sft" / "adapter", ignore_errors=True)  # in case the run got that far before the kill
    command, env = two_process_command(
        "sft", [*overrides, "train.resume=true"], deepspeed=True, zero_stage=3, port_offset=8
    )
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "resumed from" in result.stderr
    assert [h["step"] for h in history(run, "sft")][-1] == 4
    assert_same_adapter(adapter(straight, "sft"), adapter(run, "sft"), rel=1e-5)


def test_zero3_full_fine_tuning_equals_one_process(synthetic, tmp_path):
    """The whole language model trained; the saved model (gathered from the partitions) in the hub layout."""
    full = ("model.language=full",)
    one = one_process(tmp_path / "one", synthetic, "sft", *full, max_steps=2)
    two = zero3(tmp_path / "two", synthetic, "sft", *full, max_steps=2)
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-4)
    weights = [load_file(merged_dir(run, "sft") / "model.safetensors") for run in (one, two)]
    assert len(weights[0]) > 50 and (merged_dir(two, "sft") / "config.json").exists()
    assert_same_adapter(*weights)


def test_zero3_dpo_lora_equals_one_process(synthetic, tmp_path):
    """With the reference log-probs precomputed (the default): by 1 process, and shared out over the 2 ranks."""
    one = one_process(tmp_path / "one", synthetic, "dpo", max_steps=3)
    two = zero3(tmp_path / "two", synthetic, "dpo", max_steps=3)
    assert_same_steps(history(one, "dpo"), history(two, "dpo"), rtol=1e-4)
    assert_same_adapter(adapter(one, "dpo"), adapter(two, "dpo"))
    tables = [load_file(path)["ref_logps"] for path in sorted((tmp_path / ".cache" / "ref_logps").iterdir())]
    assert len(tables) == 2 and tables[0].shape == tables[1].shape and tables[0].shape[0] > 8
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-5, atol=1e-5)


def test_a_text_only_rank_beside_an_image_rank_does_not_hang(synthetic, tmp_path):
    """Two rows, one per rank at every step: one text-only, one with an image. The text-only rank must run the
    vision path too (a blank crop), else the image rank waits for its parameters forever."""
    overrides = [
        *small_overrides(tmp_path / "run", synthetic, "sft", micro_batch_size=1, grad_accum=1, max_steps=3),
        *text_and_image_rows(synthetic, tmp_path / "mixed"),
        "train.collective_timeout_s=60",
    ]
    launch_two_processes("sft", overrides, deepspeed=True, zero_stage=3, timeout=300)
    assert [h["step"] for h in history(tmp_path / "run", "sft")] == [1, 2, 3]


def test_a_quantised_model_under_zero3_is_refused_with_its_reason(synthetic, tmp_path):
    overrides = [*small_overrides(tmp_path / "q", synthetic, "sft"), "model.quantization=nf4"]
    result = launch_two_processes(
        "sft", overrides, deepspeed=True, zero_stage=3, timeout=300, expect_failure=True
    )
    assert (
        "model.quantization: nf4 with sharded parameters" in result.stderr and "zero2.yaml" in result.stderr
    )
