"""Multi-node launches proven over loopback: two launch.sh processes as node 0 and node 1 (1 CPU process each, gloo,
MASTER_ADDR=127.0.0.1) train the cut-down demo SFT exactly as 1 node x 2 processes does; the same through the SLURM
batch script, recipes/slurm/train.sbatch, in a simulated SLURM environment (the SLURM_* variables, and stand-ins for
`scontrol` printing 127.0.0.1 and for `srun` running the node's one task)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO
from ..run_helpers import DEMO, adapter, assert_same_adapter, history, small_overrides

SBATCH = REPO / "recipes" / "slurm" / "train.sbatch"
INHERITED = ("SLURM_", "NPROC", "NNODES", "NODE_RANK", "MASTER_")
# Both layouts run 2 ranks over gloo with the same all-reduce: the results agree to float rounding, in practice
# bit for bit; these bounds only leave room for a different reduction order.
RTOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_all(processes: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Wait for every process; a hang past `timeout` kills them all and fails with their logs' tails."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
        pytest.fail(f"multi-node run hung past {timeout}s:\n{tails(logs)}")
    failed = [p.returncode for p in processes if p.returncode != 0]
    assert not failed, f"exit codes {[p.returncode for p in processes]}:\n{tails(logs)}"


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)


def assert_same_run(a: Path, b: Path) -> None:
    ha, hb = history(a, "sft"), history(b, "sft")
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [1, 2, 3]
    for x, y in zip(ha, hb):
        for key in ("loss", "grad_norm", "units", "samples"):
            assert x[key] == pytest.approx(y[key], rel=RTOL, abs=1e-9), (key, x, y)
    assert_same_adapter(adapter(a, "sft"), adapter(b, "sft"), rel=RTOL)


def overrides(run_dir: Path, synthetic: Path) -> list[str]:
    return small_overrides(run_dir, synthetic, "sft", micro_batch_size=2, grad_accum=2)


@pytest.fixture(scope="module")
def one_node_two_processes(synthetic, tmp_path_factory):
    """The reference: launch.sh with NPROC=2 on one node."""
    run = tmp_path_factory.mktemp("one-node") / "run"
    log = run.parent / "launch.log"
    process = start(
        [str(REPO / "launch.sh"), str(DEMO), *overrides(run, synthetic)],
        clean_env(NPROC="2", MASTER_PORT=str(free_port())),
        log,
    )
    wait_all([process], [log], timeout=600)
    return run


@pytest.mark.slow  # 2 + 2 processes, about a minute each on 2 cores
def test_two_nodes_over_loopback_equal_one_node_with_two_processes(
    one_node_two_processes, synthetic, tmp_path
):
    run, port = tmp_path / "run", str(free_port())
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        start(
            [str(REPO / "launch.sh"), str(DEMO), *overrides(run, synthetic)],
            clean_env(NPROC="1", NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            logs[rank],
        )
        for rank in (0, 1)
    ]
    wait_all(nodes, logs, timeout=600)
    assert "--num_machines 2 --num_processes 2 --machine_rank 1" in logs[1].read_text()
    assert_same_run(one_node_two_processes, run)


def stand_ins(folder: Path) -> Path:
    """`scontrol show hostnames` printing 127.0.0.1, and `srun` running its command once (this "node"'s one task:
    each simulated node is its own `bash train.sbatch` process)."""
    folder.mkdir()
    scripts = {
        "scontrol": '#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\necho 127.0.0.1\necho 127.0.0.2\n',
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    }
    for name, text in scripts.items():
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.mark.slow  # 2 processes, about a minute on 2 cores
def test_the_slurm_batch_script_runs_two_nodes_like_one_node_with_two_processes(
    one_node_two_processes, synthetic, tmp_path
):
    bin_dir = stand_ins(tmp_path / "bin")
    run = tmp_path / "run"
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_NNODES="2",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_GPUS_ON_NODE="1",
        MASTER_PORT=str(free_port()),
    )
    nodes = [
        start(
            ["bash", str(SBATCH), str(DEMO), *overrides(run, synthetic)],
            clean_env(
                PATH=f"{bin_dir}:{os.environ['PATH']}",
                SLURM_NODEID=str(rank),
                SLURM_PROCID=str(rank),
                SLURM_LOCALID="0",
                **slurm,
            ),
            logs[rank],
        )
        for rank in (0, 1)
    ]
    wait_all(nodes, logs, timeout=600)
    node1 = logs[1].read_text()
    assert "master 127.0.0.1:" in node1 and "--machine_rank 1 --main_process_ip 127.0.0.1" in node1
    assert_same_run(one_node_two_processes, run)


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def test_the_batch_script_has_its_knobs_and_calls_launch_sh_once_per_node():
    text = SBATCH.read_text()
    for knob in (
        "#SBATCH --nodes=",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=",
        "#SBATCH --time=",
    ):
        assert knob in text
    # sed reads every host (head would close the pipe early: SIGPIPE fails scontrol under `set -o pipefail`)
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p' in text
    assert "srun" in text and "launch.sh" in text


@pytest.mark.slow  # several launch.sh dry runs, each starting Python twice: 15-20 s
def test_a_slurm_job_names_one_run_directory_for_every_node(tmp_path):
    bin_dir = stand_ins(tmp_path / "bin")
    env = dict(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="n[1-2]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
        NPROC="8",
    )
    outs = [
        dry_run(str(SBATCH), "--dry-run", "recipes/chartqa.yaml", SLURM_NODEID=str(rank), **env)
        for rank in (0, 1)
    ]
    for rank, out in enumerate(outs):
        assert out.returncode == 0, out.stderr
        assert "run directory: runs/chartqa-job77" in out.stdout
        assert (
            f"--num_machines 2 --num_processes 16 --machine_rank {rank} --main_process_ip 127.0.0.1"
            in out.stdout
        )
    assert (
        "-m train.export" in outs[0].stdout and "-m train.export" not in outs[1].stdout
    )  # export on node 0 only


def test_several_nodes_without_a_shared_run_directory_are_refused():
    out = dry_run(str(REPO / "launch.sh"), "--dry-run", "recipes/chartqa.yaml", NNODES="2", NODE_RANK="1")
    assert out.returncode != 0 and "2 nodes need one run directory" in out.stderr
