"""Elastic restart: `launch.sh --max-restarts N` (torchrun's elastic agent through accelerate launch) restarts a stage
that lost a rank, and the restarted ranks resume from the newest complete checkpoint (launch.sh passes
train.resume=true): the run ends with the weights of an uninterrupted one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from data.synthetic import DEMO_COUNTS as SYNTHETIC_COUNTS
from data.synthetic import write_synthetic
from rundir.layout import checkpoints_dir, diagnostics_file, rank_log_file

from ..conftest import REPO
from ..run_helpers import (
    DEMO,
    adapter,
    assert_same_adapter,
    history,
    run_stage,
    small_overrides,
    wait_for_file,
)

INHERITED = ("SLURM_", "NPROC", "NNODES", "NODE_RANK", "MASTER_")


@pytest.mark.slow  # 2 processes, killed once and restarted: 30-45 s on 2 cores
def test_a_killed_rank_restarts_the_stage_which_resumes_and_ends_with_the_uninterrupted_weights(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **SYNTHETIC_COUNTS)
    settings = dict(max_steps=6, checkpoint_every=2, micro_batch_size=2)
    straight = run_stage(
        "sft", small_overrides(tmp_path / "straight", synthetic, "sft", grad_accum=4, **settings)
    )

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
    env.update(
        PYTHON=sys.executable,
        NPROC="2",
        MASTER_PORT=str(29500 + os.getpid() % 1000 + 11),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
    )
    log = tmp_path / "launch.log"
    job = subprocess.Popen(
        [
            str(REPO / "launch.sh"),
            "--max-restarts",
            "1",
            str(DEMO),
            *small_overrides(run, synthetic, "sft", grad_accum=2, **settings),
            "train.collective_timeout_s=120",
        ],  # a hung start-up or step fails in minutes
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_file(job, checkpoints_dir(run, "sft") / "step-00000002" / "loop_state.json", log, 600)
        rank1 = int(re.search(r"# rank 1 of 2, pid (\d+)", diagnostics_file(run, 1).read_text()).group(1))
        os.kill(rank1, signal.SIGKILL)
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    assert diagnostics_file(run, 1).read_text().count("# rank 1 of 2") == 2, "rank 1 was not restarted"
    assert "resumed from" in rank_log_file(run, 0).read_text()
    assert [h["step"] for h in history(run, "sft")] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(history(straight, "sft"), history(run, "sft")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x, y)
    # The DDP equality tolerance (tests/whole_run/test_train_invariants.py): 2 ranks x 2 micro-batches against 1 x 4.
    assert_same_adapter(adapter(straight, "sft"), adapter(run, "sft"), rel=1e-3)


@pytest.mark.slow  # several launch.sh dry runs, each starting Python twice: 15-20 s
def test_max_restarts_reaches_the_launcher_with_resume_and_needs_several_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    args = [
        str(REPO / "launch.sh"),
        "--dry-run",
        "--max-restarts",
        "2",
        "recipes/demo.yaml",
        f"output_dir={tmp_path}",
    ]
    two = subprocess.run(
        args, cwd=REPO, env={**env, "NPROC": "2"}, capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr
    sft_command = next(line for line in two.stdout.splitlines() if "train/sft.py" in line)
    assert "--max_restarts 2" in sft_command and sft_command.rstrip().endswith("train.resume=true")
    one = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "--max-restarts needs more than one process" in one.stderr
