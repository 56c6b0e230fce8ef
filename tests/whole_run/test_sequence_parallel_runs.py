"""`train.sequence_parallel: 2` through the real entry points, on CPU processes over gloo: each run against one
process with the same global batch (docs/distributed.md#sequence-parallelism).

A group of 2 ranks holds each micro-batch, so 2 processes at N = 2 read exactly the batches of 1 process with the
same micro-batch and accumulation. Tolerances: losses 1e-5 relative at every step, trained tensors 1e-4 in relative
Frobenius norm (the gradient of each chunk is summed across ranks in another order than one process sums it).
Every launch has a timeout: a hang fails the test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from data.multipage import write_multipage
from rundir.layout import checkpoints_dir, diagnostics_file

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

SP2 = ["train.sequence_parallel=2", "train.collective_timeout_s=120"]


@pytest.fixture(scope="module")
def multipage(tmp_path_factory):
    """Documents of 150 pages: ~5,500 tokens a sample with the demo's tiny model, past the 4096 RoPE switch."""
    root = tmp_path_factory.mktemp("multipage")
    write_multipage(root, pages=150)
    return root


LONG = [
    "data.train.0.config=multipage",
    "data.eval.0.config=multipage",
    "data.max_length=8192",
    "data.train.0.limit=null",
]


def both(
    root,
    data,
    stage: str,
    *extra: str,
    launch: dict | None = None,
    micro_batch_size: int = 2,
    grad_accum: int = 2,
    **train,
):
    """(1 process, 2 ranks at N = 2, or more ranks with `launch`) on the same global batch; the N = 2 launch's
    stderr is checked for the groups it formed."""
    sizes = dict(micro_batch_size=micro_batch_size, grad_accum=grad_accum, **train)
    one = run_stage(stage, [*small_overrides(root / "one", data, stage, **sizes), *extra])
    launch = {"timeout": 600, **(launch or {})}
    processes = launch.get("processes", 2)
    if processes > 2:  # data parallel over processes / 2 groups: the same global batch with less accumulation
        sizes["grad_accum"] = grad_accum * 2 // processes
    result = launch_two_processes(
        stage, [*small_overrides(root / "two", data, stage, **sizes), *extra, *SP2], **launch
    )
    assert f"sequence parallel: {processes // 2} group(s) of 2 ranks" in result.stderr, result.stderr[-3000:]
    return one, root / "two"


def test_sft_at_n2_equals_one_process(synthetic, tmp_path):
    one, two = both(tmp_path, synthetic, "sft")
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_sft_on_samples_past_the_rope_switch(multipage, tmp_path):
    one, two = both(tmp_path, multipage, "sft", *LONG, micro_batch_size=1)
    assert min(h["tokens"] for h in history(one, "sft")) > 2 * 4096  # two samples a step, each past 4096
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_dpo_at_n2_with_the_shared_prompt_equals_one_process(synthetic, tmp_path):
    one, two = both(tmp_path, synthetic, "dpo")
    assert_same_steps(history(one, "dpo"), history(two, "dpo"), rtol=1e-5)
    assert_same_adapter(adapter(one, "dpo"), adapter(two, "dpo"), rel=1e-4)


def test_n2_times_data_parallel_2_equals_one_process(synthetic, tmp_path):
    """4 processes: 2 groups of 2 ranks, each group a data-parallel replica."""
    one, two = both(tmp_path, synthetic, "sft", launch={"processes": 4})
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_zero3_at_n2_equals_one_process(synthetic, tmp_path):
    one, two = both(tmp_path, synthetic, "sft", launch={"deepspeed": True, "zero_stage": 3})
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_zero2_at_n2_equals_one_process(synthetic, tmp_path):
    one, two = both(tmp_path, synthetic, "sft", launch={"deepspeed": True, "zero_stage": 2})
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_fsdp2_at_n2_equals_one_process(synthetic, tmp_path):
    one, two = both(tmp_path, synthetic, "sft", launch={"fsdp": True})
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_text_only_micro_batches(synthetic, tmp_path):
    """Micro-batches of one row, alternately with an image and text-only: every rank of the group joins every
    collective (the blank crop of a text-only batch is sharded like real ones)."""
    rows = text_and_image_rows(synthetic, tmp_path / "rows")
    one, two = both(tmp_path, synthetic, "sft", *rows, micro_batch_size=1, max_steps=2)
    assert_same_steps(history(one, "sft"), history(two, "sft"), rtol=1e-5)
    assert_same_adapter(adapter(one, "sft"), adapter(two, "sft"), rel=1e-4)


def test_sigterm_and_resume_at_n2_end_with_the_uninterrupted_adapter(synthetic, tmp_path):
    overrides = [
        *small_overrides(
            tmp_path / "straight", synthetic, "sft", max_steps=6, grad_accum=2, checkpoint_every=2
        ),
        *SP2,
    ]
    launch_two_processes("sft", overrides, timeout=600)
    run = tmp_path / "resumed"
    overrides = [*small_overrides(run, synthetic, "sft", max_steps=6, grad_accum=2, checkpoint_every=2), *SP2]
    command, env = two_process_command("sft", overrides, port_offset=1)
    log = tmp_path / "interrupted.log"
    with log.open("w") as stream:
        job = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_file(job, checkpoints_dir(run, "sft") / "step-00000002" / "loop_state.json", log, 300)
        rank1 = int(re.search(r"# rank 1 of 2, pid (\d+)", diagnostics_file(run, 1).read_text()).group(1))
        os.kill(rank1, signal.SIGTERM)
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    stopped = re.search(r"stopped by SIGTERM after step (\d) of 6", output)
    assert job.returncode != 0 and stopped, output[-6000:]
    launch_two_processes("sft", [*overrides, "train.resume=true"], timeout=600)
    assert_same_adapter(adapter(tmp_path / "straight", "sft"), adapter(run, "sft"), rel=1e-6)
    for x, y in zip(history(tmp_path / "straight", "sft"), history(run, "sft"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), (x, y)


def test_synced_generation_across_the_rope_switch_under_fsdp2(tmp_path):
    """The eval hook on prompts of ~4,075 tokens generating 24 more, under FSDP2 (synced generation), answers as one
    process does. Each rank's batch crosses 4096 during generation, where Phi-3 drops its cache and runs the prompt
    again, vision included: ranks whose prompts differ by a token would cross at different steps, one rank's CLIP
    units gathering while the other's decoder layers do; the common batch width makes them cross together."""
    data = tmp_path / "documents"
    paths = write_multipage(data, pages=110)
    # Questions about pages 107, 77 and 7: the two ranks' second batches differ by a token.
    rows = [json.loads(line) for line in paths.sft_eval.read_text().splitlines()]
    for row, page in zip(rows, (107, 107, 77, 7)):
        question = row["messages"][0]["content"][-1]
        question["text"] = re.sub(r"page \d+", f"page {page}", question["text"])
    paths.sft_eval.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scored = [
        *LONG,
        "stages=[sft,eval]",
        "eval.when=[sft]",
        "eval.limit=4",
        "eval.batch_size=1",
        "eval.max_new_tokens=24",
    ]
    one = run_stage(
        "sft",
        [
            *small_overrides(tmp_path / "one", data, "sft", micro_batch_size=1, grad_accum=2, max_steps=1),
            *scored,
        ],
    )
    two = tmp_path / "two"
    launch_two_processes(
        "sft",
        [
            *small_overrides(two, data, "sft", micro_batch_size=1, grad_accum=1, max_steps=1),
            *scored,
            "train.collective_timeout_s=120",
        ],
        fsdp=True,
        timeout=600,
    )
    files = sorted((one / "eval" / "predictions" / "sft").iterdir())
    assert files
    for file in files:
        assert file.read_text() == (two / "eval" / "predictions" / "sft" / file.name).read_text(), file
