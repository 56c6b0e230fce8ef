"""Hang and failure diagnostics: per-rank logs, every rank's Python stacks on SIGUSR1, from the step watchdog and on
a collective timeout, and an error that names the files to read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial

import pytest

from data.synthetic import DEMO_COUNTS as SYNTHETIC_COUNTS
from data.synthetic import write_synthetic
from rundir.layout import diagnostics_file, rank_log_file
from runtime import diagnostics

from ..conftest import REPO
from ..run_helpers import DEMO, run_stage, small_overrides


@pytest.fixture()
def stage_diagnostics(tmp_path):
    yield tmp_path
    if diagnostics._current is not None:
        diagnostics._current.close()
        diagnostics._current = None


def test_sigusr1_writes_this_ranks_stacks(stage_diagnostics):
    path = diagnostics.start(
        partial(diagnostics_file, stage_diagnostics),
        rank_log_file(stage_diagnostics, 0),
        rank=0,
        world=1,
        timeout_s=60,
    )
    assert path == diagnostics_file(stage_diagnostics, 0) and path.name == "rank-0.txt"

    def a_frame_to_find():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)

    a_frame_to_find()
    text = path.read_text()
    assert "Current thread" in text or "Thread" in text
    assert "a_frame_to_find" in text
    assert rank_log_file(stage_diagnostics, 0).is_file()


def test_a_collective_timeout_becomes_an_error_naming_the_stack_files(stage_diagnostics):
    diagnostics.start(
        partial(diagnostics_file, stage_diagnostics),
        rank_log_file(stage_diagnostics, 1),
        rank=1,
        world=2,
        timeout_s=10,
    )
    with pytest.raises(diagnostics.CollectiveTimeout) as raised:
        with diagnostics.step_guard():
            raise RuntimeError("[gloo] Timed out waiting 10000ms for recv operation to complete")
    message = str(raised.value)
    assert "train.collective_timeout_s=10 s" in message and "rank-0.txt, rank-1.txt" in message
    assert str(diagnostics_file(stage_diagnostics, 1)) in message
    assert "Timed out waiting" in diagnostics_file(stage_diagnostics, 1).read_text()
    with pytest.raises(
        ValueError
    ):  # any other error passes through unchanged (its traceback kept in the file)
        with diagnostics.step_guard():
            raise ValueError("a bad value")


def test_the_watchdog_writes_the_stacks_of_a_step_that_outlasts_the_timeout(stage_diagnostics):
    diagnostics.start(
        partial(diagnostics_file, stage_diagnostics),
        rank_log_file(stage_diagnostics, 0),
        rank=0,
        world=2,
        timeout_s=1,
    )  # watchdog at max(1, 0.9 s) = 1 s

    def a_slow_step():
        time.sleep(1.5)

    with diagnostics.step_guard():
        a_slow_step()
    text = diagnostics_file(stage_diagnostics, 0).read_text()
    assert "Timeout (0:00:01)!" in text and "a_slow_step" in text


def test_a_stage_writes_its_rank_log(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **SYNTHETIC_COUNTS)
    run = run_stage("sft", small_overrides(tmp_path / "run", synthetic, "sft", max_steps=1))
    assert "rank0" in rank_log_file(run, 0).read_text()
    assert diagnostics_file(run, 0).read_text().startswith("# rank 0 of 1")


# The test's entry point: the real train/sft.py, with rank 1 sleeping inside the loss of step 2 (a test-only
# wrapper around trainer.fit; production code has no hook for it).
SLEEPER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from train import sft
    from train.core import trainer

    fit = trainer.fit

    def sleepy_fit(*args, loss_sum, **kwargs):
        calls = []

        def a_rank_sleeping_in_its_step(model, batch):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 3:  # step 2 (2 micro-batches a step)
                time.sleep(120)
            return loss_sum(model, batch)

        return fit(*args, loss_sum=a_rank_sleeping_in_its_step, **kwargs)

    trainer.fit = sleepy_fit
    sft.cli()
""")


@pytest.mark.slow  # 2 processes; the hang is cut by the 10 s collective timeout
def test_a_rank_hung_in_a_step_stops_the_run_with_both_ranks_stacks(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **SYNTHETIC_COUNTS)
    entry = tmp_path / "sleepy_sft.py"
    entry.write_text(SLEEPER.format(repo=str(REPO)))
    run = tmp_path / "run"
    overrides = small_overrides(
        run, synthetic, "sft", micro_batch_size=2, grad_accum=2, collective_timeout_s=10
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--multi_gpu",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(29500 + os.getpid() % 1000 + 7),
        str(entry),
        str(DEMO),
        *overrides,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert seconds < 110, f"the run took {seconds:.0f} s: the timeout did not cut the 120 s sleep"
    assert "train.collective_timeout_s=10 s" in output, output[-6000:]
    assert f"{run}/diagnostics/" in output and "rank-0.txt, rank-1.txt" in output
    sleeping, waiting = diagnostics_file(run, 1).read_text(), diagnostics_file(run, 0).read_text()
    assert "a_rank_sleeping_in_its_step" in sleeping, sleeping
    assert "Timeout (0:00:09)!" in sleeping and "Timeout (0:00:09)!" in waiting
    assert "train_step" in waiting, waiting
    assert "rank1" in rank_log_file(run, 1).read_text()
