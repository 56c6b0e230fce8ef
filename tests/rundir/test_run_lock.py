"""One writer per run directory (rundir/run_lock.py): of two launches at once one runs and the other exits 2 naming
the holder; a crashed holder's lock is stale (its process is gone, or its lease ran out) and the next launch takes it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from data.synthetic import DEMO_COUNTS as SYNTHETIC_COUNTS
from data.synthetic import write_synthetic
from rundir import run_lock
from rundir.layout import lock_file

from ..run_helpers import DEMO, REPO, run_stage, small_overrides, wait_for_file

HOLD = (
    "import sys, time; from rundir import run_lock; run_lock.acquire(sys.argv[1], command='holder'); "
    "print('held', flush=True); time.sleep(600)"
)


def holding(run_dir) -> subprocess.Popen:
    """A process that takes the lock of `run_dir` and keeps it."""
    job = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert job.stdout.readline().strip() == "held"
    return job


def test_a_live_holder_refuses_a_second_writer_and_a_killed_one_leaves_a_stale_lock(tmp_path, caplog):
    run = tmp_path / "run"
    job = holding(run)
    try:
        with pytest.raises(run_lock.RunLocked) as refused:
            run_lock.acquire(run, command="second")
        message = str(refused.value)
        assert f"pid {job.pid}" in message and socket.gethostname() in message and "'holder'" in message, (
            message
        )
        assert f"remove {lock_file(run)}" in message
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert json.loads(lock_file(run).read_text())["pid"] == job.pid  # SIGKILL: nothing released it
    with caplog.at_level("WARNING", logger="rundir.run_lock"):
        lock = run_lock.acquire(run, command="after the crash")
    assert f"its process {job.pid} is gone" in caplog.text
    assert json.loads(lock_file(run).read_text())["pid"] == os.getpid()
    assert run_lock.acquire(run, command="again") is lock  # this process holds it already
    lock.release()
    assert not lock_file(run).exists()


def test_a_lock_of_another_host_is_stale_only_once_its_lease_ran_out(tmp_path):
    lock = run_lock.acquire(tmp_path, command="here", lease_s=60)
    record = json.loads(lock_file(tmp_path).read_text())
    lock.release()
    record.update(host="other-node", pid=1, token="theirs")
    lock_file(tmp_path).write_text(json.dumps({**record, "lease_until": time.time() + 60}))
    with pytest.raises(run_lock.RunLocked, match="host other-node, pid 1.*its lease runs out at"):
        run_lock.acquire(tmp_path, command="here")
    lock_file(tmp_path).write_text(json.dumps({**record, "lease_until": time.time() - 1}))
    taken = run_lock.acquire(tmp_path, command="here")
    assert taken.holder.host == socket.gethostname()
    before = json.loads(lock_file(tmp_path).read_text())["lease_until"]
    time.sleep(0.01)
    assert taken.renew() and json.loads(lock_file(tmp_path).read_text())["lease_until"] > before
    taken.release()


def test_a_stage_joins_the_lock_of_its_own_launch(tmp_path, monkeypatch, capsys):
    """launch.sh takes the lock for its own pid (`python -m rundir.run_lock acquire`) and hands the token on."""
    assert run_lock.main(["acquire", str(tmp_path), "--pid", str(os.getpid()), "--command", "launch.sh"]) == 0
    token = capsys.readouterr().out.strip()
    monkeypatch.setenv(run_lock.TOKEN_ENV, token)
    joined = run_lock.acquire(tmp_path, command="train/sft.py")
    assert not joined.owned
    joined.release()
    assert lock_file(tmp_path).exists()  # the launch's lock outlives its stages
    run_lock.main(["release", str(tmp_path), "--token", "another"])
    assert lock_file(tmp_path).exists()
    run_lock.main(["release", str(tmp_path), "--token", token])
    assert not lock_file(tmp_path).exists()


@pytest.mark.slow  # two launched runs and a resume
def test_two_launches_at_once_one_runs_the_other_exits_2_and_a_sigkilled_run_resumes(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic(synthetic, seed=0, **SYNTHETIC_COUNTS)
    run = tmp_path / "run"
    overrides = small_overrides(
        run, synthetic, "sft", max_steps=300, checkpoint_every=1, keep_checkpoints=300
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(run_lock.TOKEN_ENV, None)
    command = [sys.executable, str(REPO / "train" / "sft.py"), str(DEMO), *overrides]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    jobs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        for log in logs
    ]
    try:
        deadline = time.monotonic() + 300
        while all(job.poll() is None for job in jobs):
            assert time.monotonic() < deadline, "neither launch ended"
            time.sleep(0.1)
        loser = next(i for i, job in enumerate(jobs) if job.poll() is not None)
        winner = jobs[1 - loser]
        err = logs[loser].read_text()
        assert jobs[loser].returncode == 2, err[-3000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {winner.pid}" in err, err[-3000:]
        assert "Traceback" not in err
        wait_for_file(
            winner, run / "sft" / "checkpoints" / "step-00000002" / "manifest.json", logs[1 - loser], 300
        )
        winner.send_signal(signal.SIGKILL)
        winner.wait()
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    assert json.loads(lock_file(run).read_text())["pid"] == winner.pid  # the crash left its lock
    run_stage(
        "sft",
        [
            *overrides,
            "train.resume=true",
            "train.max_steps=3",
            "train.resume_allow_changes=[train.max_steps]",
        ],
    )  # stale: taken over, then released
    assert (run / "sft" / "adapter").is_dir() and not lock_file(run).exists()
